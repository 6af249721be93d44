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
from tables import print_table  # noqa: E402

BASELINE = "baseline-peft-bnb"
MEAN, MEDIAN = "train_tokens_per_second", "train_tokens_per_second_median_step"
PEAK = "mem_peak_torch_mem_alloc_in_bytes"


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ratio(ours: float | None, base: float | None) -> str:
    return f"{ours / base:.2f}" if ours and base else ""


def summarize(main: Path, variants: list[Path]) -> list[dict]:
    rows = []
    for path in [main, *variants]:
        if not path.exists():
            continue
        label = "main" if path == main else path.stem.split("-", 2)[-1]
        with open(path, newline="") as f:
            rows += [{**r, "variant": label} for r in csv.DictReader(f)]
    base = next((r for r in rows if r["variant"] == "main" and r.get("framework_config") == BASELINE
                 and r.get("status") == "ok"), None)
    out = []
    for r in rows:
        mean, median, peak = _number(r.get(MEAN)), _number(r.get(MEDIAN)), _number(r.get(PEAK))
        out.append({
            "variant": r["variant"], "recipe": r.get("framework_config", ""), "status": r.get("status", ""),
            "tok/s": f"{mean:,.0f}" if mean else "", "vs base": _ratio(mean, _number((base or {}).get(MEAN))),
            "median step tok/s": f"{median:,.0f}" if median else "",
            "median vs base": _ratio(median, _number((base or {}).get(MEDIAN))),
            "peak GiB": f"{peak / 2**30:.2f}" if peak else "",
            "mem vs base": _ratio(peak, _number((base or {}).get(PEAK))),
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
