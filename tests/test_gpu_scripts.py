"""The GPU call scripts run only on the device machine; here: they parse, and the variant summary's arithmetic."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from .conftest import REPO

GPU = REPO / "benchmarks" / "gpu"


@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_gpu_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def test_variant_summary_puts_every_row_on_the_main_baseline(tmp_path):
    gib = 2**30
    _write(tmp_path / "results-R.csv", [
        {"framework_config": "baseline-peft-bnb", "status": "ok", "train_tokens_per_second": 1600,
         "train_tokens_per_second_median_step": 2000, "mem_peak_torch_mem_alloc_in_bytes": 8 * gib},
        {"framework_config": "accelerated-peft-autogptq-foak-padding-free", "status": "ok",
         "train_tokens_per_second": 3200, "train_tokens_per_second_median_step": 3000,
         "mem_peak_torch_mem_alloc_in_bytes": 6 * gib},
    ])
    _write(tmp_path / "results-R-compile_model.csv", [  # a variant matrix: no baseline of its own
        {"framework_config": "accelerated-peft-autogptq-foak-padding-free", "status": "ok",
         "train_tokens_per_second": 4000, "train_tokens_per_second_median_step": 5000,
         "mem_peak_torch_mem_alloc_in_bytes": 6 * gib},
        {"framework_config": "accelerated-peft-autogptq-foak-padding-free", "status": "timeout"},
    ])
    out = subprocess.run([sys.executable, str(GPU / "variant_summary.py"), str(tmp_path / "results-R.csv"),
                          str(tmp_path / "results-R-compile_model.csv"), str(tmp_path / "results-R-missing.csv")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()[1:]]
    assert lines[1][:9] == ["main", "accelerated-peft-autogptq-foak-padding-free", "ok", "3,200", "2.00", "3,000",
                            "1.50", "6.00", "0.75"]
    assert lines[2][:7] == ["compile_model", "accelerated-peft-autogptq-foak-padding-free", "ok", "4,000", "2.50",
                            "5,000", "2.50"]
    assert lines[3] == ["compile_model", "accelerated-peft-autogptq-foak-padding-free", "timeout"]
