"""Every row of a call's bench results against the main matrix's baseline, by the mean and by the median step.

    python benchmarks/gpu/variant_summary.py results-R.csv results-R-LABEL.csv ...

The first file holds the baseline (``run_e2e.sh``'s main matrix); the others are its variants, each the same
recipes with one setting changed, named ``results-<workload>-<label>.csv``. A variant matrix has no baseline of
its own, so the bench's ratio columns are empty there; this puts them all on the one baseline of the call.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tables import print_table  # noqa: E402

from fmsaccel_cli.bench.report import PEAK, TPS, TPS_MEDIAN, add_baseline_ratios  # noqa: E402


def _ratio(value) -> str:
    return f"{value:.2f}" if value is not None else ""


def summarize(main: Path, variants: list[Path]) -> list[dict]:
    """The rows of every file, each labelled with its variant, with the bench's own ratios to the baseline: the
    variant rows share the main matrix's model, data, GPUs and batch, so they match its baseline cell."""
    rows = []
    for path in [main, *variants]:
        if not path.exists():
            continue
        label = "main" if path == main else path.stem.split("-", 2)[-1]
        with open(path, newline="") as f:
            rows += [{**r, "variant": label} for r in csv.DictReader(f)]
    out = []
    for r in add_baseline_ratios(rows):
        mean, median, peak = (float(r[k]) if r.get(k) not in (None, "") else None for k in (TPS, TPS_MEDIAN, PEAK))
        out.append({
            "variant": r["variant"], "recipe": r.get("framework_config", ""), "status": r.get("status", ""),
            "tok/s": f"{mean:,.0f}" if mean else "", "vs base": _ratio(r[f"{TPS}_vs_baseline"]),
            "median step tok/s": f"{median:,.0f}" if median else "",
            "median vs base": _ratio(r[f"{TPS_MEDIAN}_vs_baseline"]),
            "peak GiB": f"{peak / 2**30:.2f}" if peak else "", "mem vs base": _ratio(r[f"{PEAK}_vs_baseline"]),
        })
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    rows = summarize(Path(argv[0]), [Path(a) for a in argv[1:] if Path(a) != Path(argv[0])])
    if not rows:
        print(f"no results in {', '.join(argv)}")
        return 0
    print_table(rows, list(rows[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
