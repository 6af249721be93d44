"""One real bench: two cells of the tiny model through ``fmsaccel run`` (torchrun, TRL), then the report."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from fmsaccel_cli.bench.cli import bench_app
from fmsaccel_cli.bench.runner import read_recorded

SCENARIOS = """
scenarios:
  - name: baseline-peft-bnb
    framework_config: [baseline-peft-bnb]
    arguments: &lora
      torch_dtype: float32
      peft_method: lora
      r: 8
      lora_alpha: 16
      target_modules: "q_proj v_proj"
      model_name_or_path: [tiny-llama]
      training_data_path: workload:R
  - name: standard-peft
    framework_config: [""]
    arguments: *lora
"""


@pytest.mark.slow
def test_two_real_cells_and_their_report(tmp_path):
    (tmp_path / "scenarios.yaml").write_text(SCENARIOS)
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "--matrix", str(tmp_path / "scenarios.yaml"), "--effective-batch-size", "2", "--out", str(out),
        "--timeout", "600", "--set", "max_steps=3", "--set", "benchmark_warmup_steps=1", "--set", "logging_steps=1",
        "--set", "max_seq_length=128", "--set", 'save_strategy="no"', "--set", "bf16=false",
    ])
    rows = read_recorded(out)
    assert result.exit_code == 0, result.output
    assert [r["recipe"] for r in rows] == ["baseline-peft-bnb", "standard-peft"]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["train_tokens_per_second"] > 0 and row["train_loss"] > 0
        assert row["per_device_train_batch_size"] == 2 and row["target_modules"] == ["q_proj", "v_proj"]
        metrics = json.loads((out / "cells" / row["cell_dir"].split("/cells/")[1] / "metrics.json").read_text())
        assert metrics["args"]["max_steps"] == 3
    assert rows[0]["train_tokens_per_second_vs_baseline"] == 1.0
    assert rows[1]["train_tokens_per_second_vs_baseline"] > 0
    report = CliRunner().invoke(app, ["bench", "report", str(out), "--vs", str(out / "results.csv"),
                                      "--fail-on-regression", "--plot", str(tmp_path / "plots")])
    assert report.exit_code == 0, report.output
    assert "0 regression(s)" in report.output and "2 cell(s) matched" in report.output
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2
