"""``fmsaccel bench`` (run a scenarios matrix), ``bench report`` (tables, regressions, charts) and ``bench record``.

Mounted by the main app with ``app.add_typer(bench_app, name="bench")``. Nothing heavy is imported here:
cells run as separate ``fmsaccel run`` processes, and matplotlib is imported only when charts are asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from .matrix import BenchError, expand, load_defaults, load_scenarios

bench_app = typer.Typer(
    help="Benchmark recipes: run a scenarios matrix (each cell its own `fmsaccel run`) and report on the results.",
    no_args_is_help=False,
    rich_markup_mode=None,
)


def _console() -> Console:
    """Rich console per command; off a terminal (CI logs, pipes) tables get room instead of rich's 80 columns."""
    probe = Console(soft_wrap=True)
    return probe if probe.is_terminal else Console(width=200, soft_wrap=True)


LIST_HELP = "Comma- or space-separated, or repeat the option."


def _split(values: list[str] | None) -> list[str]:
    """``["4,8", "16"]`` or ``["4 8"]`` -> ``["4", "8", "16"]``: typer has no multi-value options."""
    return [item for value in values or [] for item in value.replace(",", " ").split()]


def _ints(values: list[str] | None, option: str, default: list[int]) -> list[int]:
    items = _split(values)
    try:
        return [int(v) for v in items] if items else default
    except ValueError:
        raise BenchError(f"{option}: expected integers, got {' '.join(items)}") from None


def _overrides(sets: list[str] | None, data: str | None) -> dict[str, Any]:
    from ..recipes import RecipeError, parse_set  # the same --set rules as fmsaccel run

    out: dict[str, Any] = {}
    for item in sets or []:
        try:
            key, value = parse_set(item)
        except RecipeError as e:
            raise BenchError(str(e)) from None
        out[key] = value
    if data is not None:
        out["training_data_path"] = data
    return out


def _fail(console: Console, error: Exception) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    matrix: Path = typer.Option(Path("benchmarks/scenarios.yaml"), "--matrix", help="Scenarios file (seed schema)."),
    defaults: Path | None = typer.Option(
        None, "--defaults", help="Defaults file (seed format). Default: defaults.yaml beside the matrix file, if any."
    ),
    effective_batch_size: list[str] | None = typer.Option(
        None, "--effective-batch-size", help=f"Effective batch sizes \\[default: 4 8]. {LIST_HELP}"
    ),
    num_gpus: list[str] | None = typer.Option(None, "--num-gpus", help=f"GPU counts \\[default: 1]. {LIST_HELP}"),
    run_only_scenarios: list[str] | None = typer.Option(
        None, "--run-only-scenarios", help=f"Only these scenarios (slow ones run only when named). {LIST_HELP}"
    ),
    recipes: list[str] | None = typer.Option(
        None, "--recipes", help=f"Only cells of these recipes / framework configs ('none': no plugin). {LIST_HELP}"
    ),
    models: list[str] | None = typer.Option(
        None, "--models", help=f"Replace every scenario's model list with these. {LIST_HELP}"
    ),
    data: str | None = typer.Option(
        None, "--data", help="Training data for every cell: workload:P, workload:R, or a local dataset path."
    ),
    sets: list[str] | None = typer.Option(
        None, "--set", help="Override an argument in every cell, key=value (YAML value); repeatable."
    ),
    devices: list[str] | None = typer.Option(
        None, "--devices", help="GPUs to run cells side by side on, each cell on its own num_gpus of them "
        f"(CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3. Default: one cell at a time. {LIST_HELP}"
    ),
    out: Path = typer.Option(Path("outputs/bench"), "--out", help="Results folder."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds before a cell is stopped and recorded."),
    resume: bool = typer.Option(False, "--resume", help="Continue --out, skipping cells already recorded."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Resume, and run the failed cells again."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded cells and their count; run nothing."),
) -> None:
    """Run every cell of a scenarios matrix: scenario x framework config x model x batch size x GPU count."""
    if ctx.invoked_subcommand is not None:
        return
    console = _console()
    from .runner import default_run_prefix, run_matrix

    try:
        if defaults is None and (matrix.parent / "defaults.yaml").exists() and matrix.name != "defaults.yaml":
            defaults = matrix.parent / "defaults.yaml"
        cells, impossible = expand(
            load_scenarios(matrix),
            load_defaults(defaults),
            effective_batch_sizes=_ints(effective_batch_size, "--effective-batch-size", [4, 8]),
            num_gpus=_ints(num_gpus, "--num-gpus", [1]),
            run_only_scenarios=_split(run_only_scenarios) or None,
            recipes=_split(recipes) or None,
            models=_split(models) or None,
            overrides=_overrides(sets, data),
        )
        for line in impossible:
            console.print(f"[yellow]left out[/yellow]: {escape(line)}", highlight=False)
        if not cells:
            raise BenchError("the filters leave no cell to run (slow scenarios run only when named)")
        if dry_run:
            _print_cells(console, cells, default_run_prefix(), out)
            return
        summary = run_matrix(cells, out, timeout_s=timeout, resume=resume, retry_failed=retry_failed,
                             console=console, devices=_split(devices) or None)
    except BenchError as e:
        raise _fail(console, e) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: finished cells are in {out}; continue with --resume")
        raise typer.Exit(130) from None
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.statuses.items())) or "nothing to run"
    console.print(f"bench: {summary.ran} cell(s) run ({counts}), {summary.skipped} already recorded; "
                  f"results in {out / 'results.csv'}; see: fmsaccel bench report {out}", highlight=False)


def _print_cells(console: Console, cells, run_prefix: list[str], out: Path) -> None:
    """One aligned line per cell (plain text, so logs and narrow terminals keep every name whole)."""
    import shlex

    from .runner import CELLS_DIR

    header = ("#", "recipe", "model", "data", "gpus", "eff.batch", "batch/dev", "scenario")
    lines = [header] + [
        (str(i), c.recipe, c.model_name_or_path, c.training_data_path or "-", str(c.num_gpus),
         str(c.effective_batch_size), str(c.per_device_train_batch_size), c.scenario)
        for i, c in enumerate(cells, 1)
    ]
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    for line in lines:
        console.print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip(),
                      markup=False, highlight=False, soft_wrap=True)
    first = cells[0].command(run_prefix, out / CELLS_DIR / cells[0].dir_name)
    console.print(f"first cell's command: {shlex.join(first)}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"{len(cells)} cells", highlight=False)


@bench_app.command("report")
def report(
    results: Path = typer.Argument(..., help="A bench --out folder, results.jsonl, or a CSV (the seed's refs too)."),
    vs: Path | None = typer.Option(None, "--vs", help="Reference results (e.g. a seed refs/*.csv) to compare with."),
    tolerance: float = typer.Option(0.1, "--tolerance", help="Relative change that counts as moved (0.1 = 10%)."),
    fail_on_regression: bool = typer.Option(False, "--fail-on-regression", help="Exit 1 if any cell regressed."),
    plot: Path | None = typer.Option(None, "--plot", help="Write PNG charts (tokens/s, peak memory) to this folder."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the results table as GitHub Markdown."),
) -> None:
    """Table of results and ratios to baseline-peft-bnb; regressions against a reference; charts."""
    from . import report as rep

    console = _console()
    try:
        rows = rep.read_results(results)
        reference = rep.read_results(vs) if vs is not None else None
    except BenchError as e:
        raise _fail(console, e) from None
    if markdown:
        print(rep.results_markdown(rows), end="")
    else:
        console.print(rep.results_table(rows, title=f"{results} ({len(rows)} cells)"))
    regressions = 0
    if reference is not None:
        changes, unmatched = rep.compare(rows, reference, tolerance)
        regressions = sum(c.regression for c in changes)
        if changes:
            console.print(rep.changes_table(changes, tolerance, with_data=rep.uses_data(rows, reference)))
        console.print(f"against {vs}: {regressions} regression(s), {len(changes) - regressions} improvement(s) "
                      f"beyond {tolerance:.0%}; {len(rows) - unmatched} cell(s) matched, {unmatched} without a "
                      "reference cell", highlight=False)
    if plot is not None:
        for path in rep.write_plots(rows, plot):
            console.print(f"wrote {path}", highlight=False)
    if fail_on_regression and regressions:
        raise typer.Exit(1)


@bench_app.command("record")
def record(
    results: Path = typer.Argument(..., help="A bench --out folder or its results.csv."),
    to: Path = typer.Option(..., "--to", help="The reference CSV to append to (created if missing)."),
    label: str = typer.Option(..., "--label", help="Which machine and call the rows come from (device_call)."),
) -> None:
    """Append a run's rows to a reference CSV (e.g. benchmarks/refs/h100_80gb.csv), labelled with their device call."""
    from . import report as rep

    console = _console()
    try:
        count = rep.record(results, to, label)
    except BenchError as e:
        raise _fail(console, e) from None
    console.print(f"{to}: {count} row(s) recorded as device_call {label!r}", highlight=False)


if __name__ == "__main__":  # python -m fmsaccel_cli.bench.cli: the bench without the main app
    bench_app()
