"""Read benchmark results (ours or the seed's reference CSVs), compare them, and chart them.

Rows from either source are normalised to one vocabulary: the seed's column names (older seed CSVs lacked the
``mem_`` prefix), ``framework_config`` "none" for no plugin, ``peft_method`` "" for full fine-tuning, and a
``status`` (seed rows have none: a row without tokens/s failed, which in the seed's CSVs meant out of memory).
Cells are matched, as the seed's comparison script did, on framework config, PEFT method, model, GPU count and
per-device batch, plus the data path when both sides record one (our P and R workloads are distinct cells).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .matrix import BASELINE, NO_PLUGIN, BenchError

INDEX = ("framework_config", "peft_method", "model_name_or_path", "num_gpus", "per_device_train_batch_size")
DATA = "training_data_path"
TPS = "train_tokens_per_second"
TPS_MEDIAN = "train_tokens_per_second_median_step"  # the median measured step's: one slow step does not move it
PEAK = "mem_peak_torch_mem_alloc_in_bytes"
LOSS = "train_loss"
LEGACY_NAMES = {
    "peak_torch_mem_alloc_in_bytes": PEAK,
    "torch_mem_alloc_in_bytes": "mem_torch_mem_alloc_in_bytes",
    "nvidia_mem_reserved": "mem_nvidia_mem_reserved",
    "gpu": "gpu_device_name",
}
INT_COLUMNS = ("num_gpus", "per_device_train_batch_size", "effective_batch_size", "r", "lora_alpha")
# metric -> which way is better (+1 higher, -1 lower, 0 it should not move at all)
WATCHED = {TPS: +1, PEAK: -1, LOSS: 0}
GIB = 1024**3


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _parse_csv_value(text: str) -> Any:
    if text == "":
        return None
    number = _number(text)
    if number is not None and re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", text.strip(), re.IGNORECASE):
        return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
    return text


def normalize(row: dict[str, Any]) -> dict[str, Any]:
    """One row in our vocabulary, whatever wrote it (see the module docstring)."""
    out = {LEGACY_NAMES.get(k, k): v for k, v in row.items()}
    framework = out.get("framework_config")
    out["framework_config"] = NO_PLUGIN if framework in (None, "", "none", "None") else str(framework)
    peft = out.get("peft_method")
    out["peft_method"] = "" if peft in (None, "", "none", "None") else str(peft)
    for column in INT_COLUMNS:
        number = _number(out.get(column))
        out[column] = int(number) if number is not None else out.get(column)
    for column in (TPS, TPS_MEDIAN, PEAK, LOSS, "mem_torch_mem_alloc_in_bytes", "train_runtime"):
        if column in out:
            out[column] = _number(out[column])
    out["model_name_or_path"] = str(out.get("model_name_or_path") or "")
    out[DATA] = str(out.get(DATA) or "")
    if not out.get("status"):
        out["status"] = "ok" if out.get(TPS) is not None else "failed"
    return out


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a bench output folder, a ``results.jsonl``, or any CSV with the seed's columns."""
    path = Path(path)
    if path.is_dir():
        for name in ("results.jsonl", "results.csv"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise BenchError(f"{path}: no results.jsonl or results.csv in this folder")
    if not path.exists():
        raise BenchError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}: not a results file (line {e.lineno}: {e.msg})") from None
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [{k: _parse_csv_value(v or "") for k, v in r.items() if k} for r in csv.DictReader(f)]
    else:
        raise BenchError(f"{path}: expected a .jsonl or .csv results file")
    if rows and "model_name_or_path" not in rows[0]:
        raise BenchError(f"{path}: no model_name_or_path column; not a benchmark results file")
    return [normalize(r) for r in rows]


def record(results: str | Path, reference: str | Path, label: str) -> int:
    """Append the rows of a bench ``results.csv`` (or its folder) to a reference CSV, each with ``device_call=label``.

    A reference file gathers several device calls (machines): ``report`` compares ratios within a call only.
    Columns the reference lacks are added (empty for its older rows), so nothing a new run recorded is dropped.
    Returns the number of rows appended.
    """
    results, reference = Path(results), Path(reference)
    if results.is_dir():
        results = results / "results.csv"
    if not results.exists() or results.suffix != ".csv":
        raise BenchError(f"{results}: expected a bench results.csv (or the --out folder holding one)")
    if not label.strip():
        raise BenchError("the device-call label is empty; say which machine and call the rows come from")
    with open(results, newline="") as f:
        new_rows = list(csv.DictReader(f))
    if new_rows and "model_name_or_path" not in new_rows[0]:
        raise BenchError(f"{results}: no model_name_or_path column; not a benchmark results file")
    old_rows: list[dict[str, str]] = []
    columns = ["device_call"]
    if reference.exists():
        with open(reference, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or columns)
            old_rows = list(reader)
        if "device_call" not in columns:
            columns.insert(0, "device_call")
    columns += [c for c in (new_rows[0] if new_rows else {}) if c not in columns]
    from ..files import atomic_write

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(old_rows)
    writer.writerows({**row, "device_call": label} for row in new_rows)
    atomic_write(reference, buf.getvalue())  # written whole, then renamed: an interrupted record loses nothing
    return len(new_rows)


def uses_data(*tables: list[dict[str, Any]]) -> bool:
    return all(any(r.get(DATA) for r in t) for t in tables)


def cell_key(row: dict[str, Any], with_data: bool) -> tuple:
    return tuple(row.get(k) for k in INDEX) + ((row.get(DATA),) if with_data else ())


# ---------------------------------------------------------------------------------------------- baseline ratios


def add_baseline_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row plus ``*_vs_baseline``: its tokens/s and peak memory over the ``baseline-peft-bnb`` cell's with the
    same model, data, GPU count, per-device batch and device call (rows are not changed in place)."""
    normal = [normalize(r) for r in rows]
    baselines = {}
    for n in normal:
        if n["framework_config"] == BASELINE and n["status"] == "ok":
            baselines.setdefault(_baseline_key(n), n)
    out = []
    for row, n in zip(rows, normal, strict=True):
        row = dict(row)
        base = baselines.get(_baseline_key(n))
        for metric in (TPS, TPS_MEDIAN, PEAK):
            ours, theirs = n.get(metric), (base or {}).get(metric)
            ok = n["status"] == "ok" and ours is not None and theirs
            row[f"{metric}_vs_baseline"] = round(ours / theirs, 4) if ok else None
        out.append(row)
    return out


def _baseline_key(row: dict[str, Any]) -> tuple:
    # device_call: a reference file that gathers several device calls (machines) compares within each call only
    return (row["model_name_or_path"], row.get(DATA), row.get("num_gpus"), row.get("per_device_train_batch_size"),
            row.get("device_call"))


# ---------------------------------------------------------------------------------------------- regressions


@dataclass(frozen=True)
class Change:
    """A watched metric (or the status) of one cell that moved beyond tolerance against the reference."""

    key: tuple
    metric: str
    reference: Any
    new: Any
    relative: float | None
    regression: bool


def compare(rows: list[dict[str, Any]], reference: list[dict[str, Any]], tolerance: float) -> tuple[list[Change], int]:
    """(changes beyond ``tolerance``, number of our cells without a reference cell).

    Tokens/s down and peak memory up are regressions, up/down improvements; any move of the loss is a regression
    (the recipes must not change the numerics). A cell that ran in the reference and fails now is a regression.
    """
    with_data = uses_data(rows, reference)
    ref_by_key: dict[tuple, dict] = {}
    for r in reference:
        ref_by_key.setdefault(cell_key(r, with_data), r)
    changes: list[Change] = []
    unmatched = 0
    for row in rows:
        key = cell_key(row, with_data)
        ref = ref_by_key.get(key)
        if ref is None:
            unmatched += 1
            continue
        if (ref["status"] == "ok") != (row["status"] == "ok"):
            changes.append(Change(key, "status", ref["status"], row["status"], None, row["status"] != "ok"))
            continue
        if row["status"] != "ok":
            continue
        for metric, better in WATCHED.items():
            old, new = ref.get(metric), row.get(metric)
            if old is None or new is None or old == 0:
                continue
            relative = (new - old) / abs(old)
            if abs(relative) > tolerance:
                changes.append(Change(key, metric, old, new, relative, better == 0 or relative * better < 0))
    return changes, unmatched


# ---------------------------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {fc: i for i, fc in enumerate(dict.fromkeys(r["framework_config"] for r in rows))}
    return sorted(rows, key=lambda r: (r["model_name_or_path"], r.get(DATA) or "", r.get("num_gpus") or 0,
                                       r.get("per_device_train_batch_size") or 0, order[r["framework_config"]]))


def _result_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The results table's column names and cells: every cell with its tokens/s, peak memory, loss and ratios."""
    rows = [normalize(r) for r in add_baseline_ratios(rows)]
    with_data = any(r.get(DATA) for r in rows)
    columns = ["framework_config", "peft", "model"] + (["data"] if with_data else [])
    columns += ["gpus", "batch/dev", "status", "tok/s/dev", "vs base", "median step vs base", "peak GiB", "mem vs base",
                "loss"]
    table = []
    for r in _sorted(rows):
        peak = r.get(PEAK) / GIB if r.get(PEAK) is not None else None
        cells = [r["framework_config"], r["peft_method"] or "-", r["model_name_or_path"]]
        cells += [r.get(DATA) or "-"] if with_data else []
        cells += [str(r.get("num_gpus")), str(r.get("per_device_train_batch_size")), r["status"], _fmt(r.get(TPS)),
                  _fmt(_number(r.get(f"{TPS}_vs_baseline")), ".2f"),
                  _fmt(_number(r.get(f"{TPS_MEDIAN}_vs_baseline")), ".2f"), _fmt(peak, ".2f"),
                  _fmt(_number(r.get(f"{PEAK}_vs_baseline")), ".2f"), _fmt(r.get(LOSS), ".4f")]
        table.append(cells)
    return columns, table


_LEFT = ("framework_config", "peft", "model", "data", "status")


def results_table(rows: list[dict[str, Any]], title: str = "benchmark results"):
    """A rich Table of :func:`_result_cells` (failed statuses in red)."""
    from rich.markup import escape
    from rich.table import Table

    columns, cells = _result_cells(rows)
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, justify="left" if name in _LEFT else "right")
    status = columns.index("status")
    for row in cells:
        row = [escape(c) for c in row]
        if row[status] != "ok":
            row[status] = f"[red]{row[status]}[/red]"
        table.add_row(*row)
    return table


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The same table in GitHub Markdown, to paste into a README."""
    columns, cells = _result_cells(rows)
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(":---" if name in _LEFT else "---:" for name in columns) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def changes_table(changes: list[Change], tolerance: float, with_data: bool):
    from rich.table import Table

    table = Table(title=f"moved beyond {tolerance:.0%} against the reference", title_justify="left")
    for name in [*INDEX, *([DATA] if with_data else []), "metric", "reference", "new", "change", "verdict"]:
        table.add_column(name)
    for c in changes:
        change = "-" if c.relative is None else f"{c.relative:+.1%}"
        verdict = "[red]regression[/red]" if c.regression else "[green]improvement[/green]"
        ref, new = (_show(c.metric, c.reference), _show(c.metric, c.new))
        table.add_row(*[str(k) for k in c.key], c.metric, str(ref), str(new), change, verdict)
    return table


def _show(metric: str, value: Any) -> str:
    if metric.startswith("mem_") and isinstance(value, int | float):
        return f"{value / GIB:.2f} GiB"
    return _fmt(value, ",.4g") if isinstance(value, int | float) else str(value)


# ---------------------------------------------------------------------------------------------- charts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def write_plots(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Bar charts of tokens/s and peak memory per recipe, one PNG per metric and model (and data path).

    Bars are grouped by recipe; each GPU count / per-device batch is one bar of the group, labelled with its ratio
    to the baseline-peft-bnb cell. Failed cells show their status instead of a bar, so an OOM is visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [normalize(r) for r in add_baseline_ratios(rows)]
    written = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model_name_or_path"], r.get(DATA) or ""), []).append(r)
    for (model, data), group in groups.items():
        recipes = list(dict.fromkeys(_recipe_label(r) for r in group))
        series = sorted({(r.get("num_gpus") or 0, r.get("per_device_train_batch_size") or 0) for r in group})
        for metric, ylabel, scale, stem in ((TPS, "train tokens/s per device", 1.0, "tokens_per_second"),
                                            (PEAK, "peak torch memory (GiB)", 1 / GIB, "peak_memory")):
            fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(recipes) * max(1, len(series)) ** 0.5 + 2), 4.8))
            width = 0.8 / max(1, len(series))
            for j, (gpus, batch) in enumerate(series):
                label = f"{gpus} GPU x batch {batch}"
                for i, recipe in enumerate(recipes):
                    cell = next((r for r in group if _recipe_label(r) == recipe and
                                 (r.get("num_gpus") or 0, r.get("per_device_train_batch_size") or 0) == (gpus, batch)),
                                None)
                    if cell is None:
                        continue
                    x = i - 0.4 + width * (j + 0.5)
                    value = cell.get(metric)
                    if cell["status"] == "ok" and value is not None:
                        ax.bar(x, value * scale, width, color=f"C{j}", label=label)
                        label = None  # one legend entry per series
                        ratio = _number(cell.get(f"{metric}_vs_baseline"))
                        if ratio is not None and len(series) <= 4:
                            ax.text(x, value * scale, f"x{ratio:.2f}", ha="center", va="bottom", fontsize=6)
                    else:
                        ax.text(x, 0, cell["status"], rotation=90, ha="center", va="bottom", fontsize=7, color="red")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(recipes)), recipes, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}" + (f" - {data}" if data else ""), fontsize=10)
            fig.tight_layout()
            path = out_dir / f"{stem}__{_slug(model)}" f"{'__' + _slug(data) if data else ''}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _recipe_label(row: dict[str, Any]) -> str:
    if row["framework_config"] != NO_PLUGIN:
        return row["framework_config"]
    return row.get("recipe") or ("standard-peft" if row["peft_method"] else "full-finetuning")
