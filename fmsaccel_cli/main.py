"""The ``fmsaccel`` command line: parse, resolve, launch. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import recipes as rc
from .bench.cli import bench_app

app = typer.Typer(help="Accelerated LLM fine-tuning: recipes, plugins, kernels, benchmarks.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="List, show, copy and validate recipes.", no_args_is_help=True)
plugins_app = typer.Typer(help="List and install plugins.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(plugins_app, name="plugins")
app.add_typer(bench_app, name="bench")
console = Console()
err = Console(stderr=True)
DEFAULT_RECIPE = "accelerated-peft-bnb"


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def complete_recipe(incomplete: str) -> list[str]:
    try:
        return [n for n in rc.recipe_names() if n.startswith(incomplete)]
    except rc.RecipeError:
        return []


def complete_plugin(incomplete: str) -> list[str]:
    from fmsaccel_framework.registry import discover

    return [n for n in discover() if n.startswith(incomplete)]


# ------------------------------------------------------------------------------------------------ recipes


@recipes_app.command("list")
def recipes_list() -> None:
    """Every recipe: name, plugins, one-line description."""
    table = Table("recipe", "plugins", "description")
    for info in rc.catalog().values():
        table.add_row(info.name, ", ".join(info.plugins) or "-", info.description)
    console.print(table)


@recipes_app.command("show")
def recipes_show(
    name: str = typer.Argument(..., autocompletion=complete_recipe),
    config: Path = typer.Option(None, "--config", help="recipe file or framework config merged on top"),
    set_: list[str] = typer.Option([], "--set", help="key=value override (repeatable)"),
) -> None:
    """The fully merged config, and for each key the file it came from."""
    try:
        resolved = rc.resolve(name, config, set_)
        rc.validate(resolved, check_args=False)
    except rc.RecipeError as e:
        fail(str(e))
    table = Table("key", "value", "from", title=f"recipe {name}")
    for key, source in sorted(resolved.sources.items(), key=lambda kv: (not kv[0].startswith("args"), kv[0])):
        node: object = {"args": resolved.args, "plugins": resolved.plugins}
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) and part in node else node
        table.add_row(key.removeprefix("args."), escape(json.dumps(node)), source)
    console.print(table)
    for note in resolved.notes:
        console.print(f"note: {note}")


@recipes_app.command("cp")
def recipes_cp(
    name: str = typer.Argument(..., autocompletion=complete_recipe), path: Path = typer.Argument(...)
) -> None:
    """Write an editable copy of a recipe (run it with --config PATH, or validate it)."""
    try:
        resolved = rc.resolve(name)
    except rc.RecipeError as e:
        fail(str(e))
    if path.exists():
        fail(f"{path} exists; choose another path")
    text = (f"# Editable copy of recipe '{name}'. Run: fmsaccel run --recipe {name} --config {path}\n"
            + yaml.safe_dump(resolved.to_yaml_dict(), sort_keys=False))
    try:
        path.write_text(text)
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror}")
    console.print(f"wrote {path}")


@recipes_app.command("validate")
def recipes_validate(path: Path = typer.Argument(..., exists=False)) -> None:
    """Validate a recipe file, framework config or scenarios file without building anything."""
    try:
        data = rc._load_yaml(path)
        if isinstance(data, dict) and "scenarios" in data:
            count = rc.validate_scenarios(path)
            console.print(f"[green]ok[/] {path}: {count} scenario(s)")
            return
        resolved = rc.load_recipe_file(path)
        active = rc.validate(resolved, check_args=bool(resolved.args))
    except rc.RecipeError as e:
        fail(str(e))
    names = ", ".join(s.name for s, _ in active) or "no plugins"
    console.print(f"[green]ok[/] {path}: {names}")


# ------------------------------------------------------------------------------------------------ run


@app.command()
def run(
    recipe: str = typer.Option(None, "--recipe", "-r", autocompletion=complete_recipe, show_default=False,
                               help="recipe name (fmsaccel recipes list); default: the --config file's recipe, "
                                    "else accelerated-peft-bnb"),
    config: Path = typer.Option(None, "--config", help="recipe file or bare framework config merged on top"),
    set_: list[str] = typer.Option([], "--set", help="key=value override, value parsed as YAML (repeatable)"),
    model: str = typer.Option(None, "--model", help="model folder or built-in shape (llama3-8b, ...)"),
    data: str = typer.Option(None, "--data", help="JSON/JSONL file, datasets folder, or workload:P|R"),
    output_dir: str = typer.Option(None, "--output-dir", "-o"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node"),
    nnodes: int = typer.Option(1, "--nnodes"),
    node_rank: int = typer.Option(0, "--node-rank"),
    master_addr: str = typer.Option(None, "--master-addr"),
    master_port: int = typer.Option(None, "--master-port"),
    rdzv_endpoint: str = typer.Option(None, "--rdzv-endpoint", help="host:port for c10d rendezvous"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in the output dir"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and command, then stop"),
    no_install: bool = typer.Option(False, "--no-install", help="never pip-install missing plugin extras"),
    yes: bool = typer.Option(False, "--yes", "-y", help="install missing extras without asking"),
) -> None:
    """Resolve a recipe and launch a TRL SFT run through torchrun with its plugins."""
    from . import launch

    opts = launch.LaunchOptions(nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_endpoint, resume)
    overrides = {"model_name_or_path": model, "training_data_path": data, "output_dir": output_dir}
    try:
        recipe = recipe or (config is not None and rc.config_file_recipe(config)) or DEFAULT_RECIPE
        resolved = rc.resolve(recipe, config, set_, overrides)
        active = launch.prepare(resolved, opts)
        missing = launch.missing_extras(active)
        if missing and (no_install or dry_run):
            lines = "; ".join(f"{p} needs {', '.join(m)}: {shlex.join(c)}" for p, m, c in missing)
            if no_install:
                fail(f"missing plugin extras ({lines})")
            console.print(f"note: would install missing extras: {lines}")
        out = Path(resolved.args["output_dir"])
        if dry_run:
            for note in resolved.notes:
                console.print(f"note: {note}")
            console.print(yaml.safe_dump(resolved.to_yaml_dict(), sort_keys=False))
            console.print(shlex.join(launch.torchrun_command(out / "fmsaccel-config.yaml", opts)), soft_wrap=True)
            return
        if missing:
            launch.install([c for _, _, c in missing], yes, lambda q: typer.confirm(q, default=True))
        launch.check_hardware(active, opts)
    except rc.RecipeError as e:
        fail(str(e))
    for note in resolved.notes:
        console.print(f"note: {note}")
    if not resume and any(out.glob("checkpoint-*")):
        console.print(f"note: {out} holds checkpoints from an earlier run; pass --resume to continue it")
    path = launch.write_config(resolved, out)
    cmd = launch.torchrun_command(path, opts)
    console.print(f"[bold]fmsaccel[/] recipe {recipe}: plugins {', '.join(s.name for s, _ in active) or 'none'}")
    console.print(f"config: {path}\nlaunch: {shlex.join(cmd)}", soft_wrap=True, highlight=False)
    raise typer.Exit(launch.stream(cmd))


# ------------------------------------------------------------------------------------------------ plugins


@plugins_app.command("list")
def plugins_list() -> None:
    """Every plugin, installed or not, the config paths that activate it, and what it needs."""
    from fmsaccel_framework.registry import discover

    table = Table("plugin", "activated by (under plugins:)", "needs", "status", "description")
    for spec in discover().values():
        missing = spec.missing_requirements()
        status = "[green]ready[/]" if not missing else f"[yellow]missing {', '.join(missing)}[/]"
        needs = f"fmsaccel[{spec.extra}]" + (f" ({', '.join(spec.requires)})" if spec.requires else "")
        table.add_row(spec.name, "\n".join(spec.paths), needs, status, spec.description)
    console.print(table)


@plugins_app.command("install")
def plugins_install(
    names: list[str] = typer.Argument(..., autocompletion=complete_plugin),
    yes: bool = typer.Option(True, "--yes/--ask"),
) -> None:
    """Install the extras of the named plugins with pip (the command is printed first)."""
    from fmsaccel_framework.registry import discover

    from . import launch

    specs = discover()
    for name in names:
        if name not in specs:
            fail(f"unknown plugin '{name}'{rc.closest(name, specs)} (see: fmsaccel plugins list)")
    try:
        launch.install([specs[n].pip_command() for n in names], yes, lambda q: typer.confirm(q, default=True))
    except rc.RecipeError as e:
        fail(str(e))


# ------------------------------------------------------------------------------------------------ env


@app.command()
def env() -> None:
    """Python, torch, CUDA, GPU and library versions against tested ranges; which plugins can run here."""
    from .environment import report

    for title, rows in report():
        table = Table(*rows[0], title=title)
        for row in rows[1:]:
            table.add_row(*row)
        console.print(table)


# ------------------------------------------------------------------------------------------------ quantize


@app.command()
def quantize(
    model: str = typer.Argument(..., help="model folder or built-in shape name"),
    out: Path = typer.Option(..., "--out", help="output folder (standard GPTQ layout)"),
    method: str = typer.Option("gptq", "--method", help="gptq or rtn"),
    bits: int = typer.Option(4, "--bits"),
    group_size: int = typer.Option(128, "--group-size", help="32, 64, 128 or -1 (per channel)"),
    act_order: bool = typer.Option(False, "--act-order/--no-act-order"),
    sym: bool = typer.Option(True, "--sym/--no-sym"),
    calib_data: str = typer.Option(None, "--calib-data", help="JSON/JSONL calibration data (default: shipped data)"),
    calib_samples: int = typer.Option(128, "--calib-samples"),
) -> None:
    """Quantise a model to 4-bit GPTQ (or round-to-nearest) in the standard checkpoint layout."""
    if method not in ("gptq", "rtn"):
        fail(f"--method must be gptq or rtn, not '{method}'")
    try:
        from fmsaccel_framework.plugin import PluginError
        from fmsaccel_peft.gptq.quantize import quantize_model
    except ImportError as e:
        fail(f"the GPTQ plugin cannot be imported ({e}); install it with: pip install 'fmsaccel[gptq]'")
    try:
        path = quantize_model(model, out, method=method, bits=bits, group_size=group_size, act_order=act_order,
                              sym=sym, calib_data=calib_data, calib_samples=calib_samples,
                              progress=lambda msg: console.print(msg, highlight=False))
    except (PluginError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"[green]wrote[/] {path}")


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
