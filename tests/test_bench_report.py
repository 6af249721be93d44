"""``fmsaccel bench report``: reading ours and the seed's CSVs, baseline ratios, regressions, charts."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from fmsaccel_cli.bench.cli import bench_app
from fmsaccel_cli.bench.report import add_baseline_ratios, compare, read_results, results_table, write_plots

# The seed's reference-CSV layout (its refs/a100_80gb.csv columns; the numbers are made up): "none" for no plugin,
# empty peft_method for full fine-tuning, space-separated target_modules, an OOM cell as a row with empty metrics.
SEED_CSV = """\
bf16,epoch,fp16,framework_config,learning_rate,lora_alpha,lora_dropout,mem_nvidia_mem_reserved,\
mem_peak_torch_mem_alloc_in_bytes,mem_torch_mem_alloc_in_bytes,model_name_or_path,num_gpus,peft_method,\
per_device_train_batch_size,r,target_modules,torch_dtype,train_loss,train_runtime,train_samples_per_second,\
train_steps_per_second,train_tokens_per_second
,0.15,,none,2e-5,,,70000.0,70000000000.0,40000000000.0,mistral-7b,1,,4,,,bfloat16,0.84,500.0,0.7,0.18,3000.0
,,,none,2e-5,,,80000.0,,,mixtral-8x7b,1,,4,,,bfloat16,,,,,
True,0.15,,baseline-peft-bnb,2e-4,16,0.1,25000.0,20000000000.0,4000000000.0,mistral-7b,1,lora,4,16,q_proj k_proj,\
bfloat16,0.875,500.0,0.7,0.17,2800.0
True,0.15,,accelerated-peft-bnb-foak,2e-4,16,0.1,19000.0,13000000000.0,4000000000.0,mistral-7b,1,lora,4,16,\
q_proj k_proj,bfloat16,0.875,400.0,0.9,0.25,4000.0
True,0.15,,accelerated-peft-bnb,2e-4,16,0.1,18000.0,15000000000.0,4000000000.0,mistral-7b,1,lora,4,16,\
q_proj k_proj,bfloat16,0.874,460.0,0.8,0.2,3500.0
True,0.15,,accelerated-peft-autogptq,2e-4,16,0.1,20000.0,16000000000.0,4000000000.0,mistral-7b,1,lora,4,16,\
q_proj k_proj,bfloat16,0.9,450.0,0.8,0.2,3200.0
True,0.15,,foak-fast-kernels,2e-4,16,0.1,28000.0,24000000000.0,14000000000.0,mistral-7b,1,lora,4,16,\
q_proj k_proj,bfloat16,0.86,430.0,0.9,0.23,3700.0
"""
# An older seed layout: memory columns without the mem_ prefix, an index column.
OLD_SEED_CSV = """\
acceleration_framework_config_file,framework_config,index,model_name_or_path,num_gpus,nvidia_mem_reserved,\
peak_torch_mem_alloc_in_bytes,peft_method,per_device_train_batch_size,torch_mem_alloc_in_bytes,train_loss,\
train_tokens_per_second
,none,0,mistral-7b,1,77000.0,72000000000.0,,4,44000000000.0,0.92,2700.0
"""


def _ours(**changes) -> list[dict]:
    """Rows as the bench writes them, for SEED_CSV's mistral-7b LoRA cells."""
    base = {"peft_method": "lora", "model_name_or_path": "mistral-7b", "num_gpus": 1, "per_device_train_batch_size": 4,
            "status": "ok", "train_loss": 0.875, "mem_peak_torch_mem_alloc_in_bytes": 2.0e10}
    rows = [
        {**base, "framework_config": "baseline-peft-bnb", "train_tokens_per_second": 2800.0,
         "train_tokens_per_second_median_step": 3000.0},
        # tokens/s down 20%: regression
        {**base, "framework_config": "accelerated-peft-bnb-foak", "train_tokens_per_second": 4000.0 * 0.8,
         "mem_peak_torch_mem_alloc_in_bytes": 1.3e10},
        # tokens/s up 20%: improvement; memory up 15%: regression
        {**base, "framework_config": "accelerated-peft-bnb", "train_tokens_per_second": 3500.0 * 1.2,
         "train_tokens_per_second_median_step": 4500.0,
         "mem_peak_torch_mem_alloc_in_bytes": 1.5e10 * 1.15, "train_loss": 0.874},
        # within tolerance everywhere
        {**base, "framework_config": "foak-fast-kernels", "train_tokens_per_second": 3700.0 * 1.05,
         "mem_peak_torch_mem_alloc_in_bytes": 2.4e10 * 0.97, "train_loss": 0.86},
        # ran in the reference, out of memory now
        {**base, "framework_config": "accelerated-peft-autogptq", "status": "oom", "train_tokens_per_second": None,
         "train_loss": None, "mem_peak_torch_mem_alloc_in_bytes": None},
        # no reference cell
        {**base, "framework_config": "aadp-padding-free", "train_tokens_per_second": 5000.0},
    ]
    for row in rows:
        row.update(changes.get(row["framework_config"], {}))
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_the_seed_reference_csv(tmp_path):
    (tmp_path / "ref.csv").write_text(SEED_CSV)
    rows = read_results(tmp_path / "ref.csv")
    assert len(rows) == 7
    full, oom = rows[0], rows[1]
    assert (full["framework_config"], full["peft_method"], full["status"]) == ("none", "", "ok")
    assert full["num_gpus"] == 1 and full["per_device_train_batch_size"] == 4
    assert full["train_tokens_per_second"] == 3000.0 and full["learning_rate"] == 2e-5
    assert oom["status"] == "failed" and oom["train_tokens_per_second"] is None
    assert rows[2]["target_modules"] == "q_proj k_proj" and rows[2]["r"] == 16
    (tmp_path / "old.csv").write_text(OLD_SEED_CSV)
    old = read_results(tmp_path / "old.csv")[0]
    assert old["mem_peak_torch_mem_alloc_in_bytes"] == 7.2e10 and old["mem_nvidia_mem_reserved"] == 77000.0


def test_baseline_ratios_match_model_batch_and_gpus():
    rows = _ours() + [{**_ours()[1], "num_gpus": 2, "per_device_train_batch_size": 2}]
    ratios = {(r["framework_config"], r["num_gpus"]): r for r in add_baseline_ratios(rows)}
    assert ratios[("baseline-peft-bnb", 1)]["train_tokens_per_second_vs_baseline"] == 1.0
    foak = ratios[("accelerated-peft-bnb-foak", 1)]
    assert foak["train_tokens_per_second_vs_baseline"] == round(3200 / 2800, 4)
    assert foak["mem_peak_torch_mem_alloc_in_bytes_vs_baseline"] == 0.65
    assert ratios[("accelerated-peft-autogptq", 1)]["train_tokens_per_second_vs_baseline"] is None  # failed cell
    assert ratios[("accelerated-peft-bnb-foak", 2)]["train_tokens_per_second_vs_baseline"] is None  # no baseline
    # the median measured step's tokens/s, where both rows have it
    assert ratios[("accelerated-peft-bnb", 1)]["train_tokens_per_second_median_step_vs_baseline"] == 1.5
    assert foak["train_tokens_per_second_median_step_vs_baseline"] is None


def test_baseline_ratios_stay_within_a_device_call():
    """A reference file gathering several device calls compares each row with its own call's baseline."""
    first = [{**r, "device_call": "a"} for r in _ours()]
    second = [{**r, "device_call": "b", "train_tokens_per_second": (r["train_tokens_per_second"] or 0) / 2}
              for r in _ours()]
    for row in add_baseline_ratios(first + second):
        if row["framework_config"] == "accelerated-peft-bnb-foak":
            assert row["train_tokens_per_second_vs_baseline"] == round(3200 / 2800, 4), row["device_call"]


def test_regressions_against_the_reference(tmp_path):
    (tmp_path / "ref.csv").write_text(SEED_CSV)
    ours = read_results(_write_jsonl(tmp_path / "results.jsonl", _ours()))
    changes, unmatched = compare(ours, read_results(tmp_path / "ref.csv"), tolerance=0.1)
    found = {(c.key[0], c.metric): c for c in changes}
    assert set(found) == {  # a failed cell is one status change, not one per metric
        ("accelerated-peft-bnb-foak", "train_tokens_per_second"),
        ("accelerated-peft-bnb", "train_tokens_per_second"),
        ("accelerated-peft-bnb", "mem_peak_torch_mem_alloc_in_bytes"),
        ("accelerated-peft-autogptq", "status"),
    }
    assert found[("accelerated-peft-bnb-foak", "train_tokens_per_second")].regression
    assert abs(found[("accelerated-peft-bnb-foak", "train_tokens_per_second")].relative + 0.2) < 1e-9
    assert not found[("accelerated-peft-bnb", "train_tokens_per_second")].regression  # faster is an improvement
    assert found[("accelerated-peft-bnb", "mem_peak_torch_mem_alloc_in_bytes")].regression
    assert found[("accelerated-peft-autogptq", "status")].regression
    assert unmatched == 1  # aadp-padding-free has no reference cell
    # the loss must not move in either direction
    moved = _ours(**{"foak-fast-kernels": {"train_loss": 0.7}})
    lower_loss = read_results(_write_jsonl(tmp_path / "loss.jsonl", moved))
    changes, _ = compare(lower_loss, read_results(tmp_path / "ref.csv"), tolerance=0.1)
    loss = [c for c in changes if c.metric == "train_loss"]
    assert [(c.key[0], c.regression) for c in loss] == [("foak-fast-kernels", True)]


def test_data_path_is_part_of_the_match_when_both_sides_have_it(tmp_path):
    ref = [{**r, "training_data_path": "workload:P"} for r in _ours()]
    ours = [{**r, "training_data_path": "workload:R", "train_tokens_per_second": 1.0} for r in _ours()]
    changes, unmatched = compare(read_results(_write_jsonl(tmp_path / "a.jsonl", ours)),
                                 read_results(_write_jsonl(tmp_path / "b.jsonl", ref)), tolerance=0.1)
    assert (changes, unmatched) == ([], 6)  # R cells are never compared with P cells


def _cli(args: list[str]):
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    return CliRunner().invoke(app, ["bench", *args])


def test_report_cli_fails_on_regression_only_when_asked(tmp_path):
    (tmp_path / "ref.csv").write_text(SEED_CSV)
    results = _write_jsonl(tmp_path / "results.jsonl", _ours())
    shown = _cli(["report", str(results), "--vs", str(tmp_path / "ref.csv")])
    assert shown.exit_code == 0, shown.output
    assert "3 regression(s), 1 improvement(s) beyond 10%" in shown.output
    assert "5 cell(s) matched, 1 without a reference cell" in shown.output
    failing = _cli(["report", str(results), "--vs", str(tmp_path / "ref.csv"), "--fail-on-regression"])
    assert failing.exit_code == 1
    healthy = _write_jsonl(tmp_path / "healthy.jsonl", _ours()[:4])
    lenient = _cli(["report", str(healthy), "--vs", str(tmp_path / "ref.csv"), "--tolerance", "0.3",
                    "--fail-on-regression"])
    assert lenient.exit_code == 0, lenient.output
    assert "0 regression(s), 0 improvement(s) beyond 30%" in lenient.output


def test_report_of_a_missing_file_is_a_one_line_error(tmp_path):
    result = _cli(["report", str(tmp_path / "nothing.csv")])
    assert result.exit_code == 2
    assert "nothing.csv: file not found" in result.output


def test_table_and_plots(tmp_path):
    rows = _ours() + [{**r, "model_name_or_path": "llama3-8b", "training_data_path": "workload:R"} for r in _ours()]
    table = results_table(rows)
    assert table.row_count == 12
    written = write_plots(rows, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["peak_memory__llama3-8b__workload_R.png", "peak_memory__mistral-7b.png",
                     "tokens_per_second__llama3-8b__workload_R.png", "tokens_per_second__mistral-7b.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_cli_writes_plots_for_seed_csv(tmp_path):
    (tmp_path / "ref.csv").write_text(SEED_CSV)
    result = _cli(["report", str(tmp_path / "ref.csv"), "--plot", str(tmp_path / "charts")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == [
        "peak_memory__mistral-7b.png", "peak_memory__mixtral-8x7b.png",
        "tokens_per_second__mistral-7b.png", "tokens_per_second__mixtral-8x7b.png",
    ]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_record_appends_labelled_calls_and_keeps_new_columns(tmp_path):
    """Two device calls into one reference file; the second adds a column; ratios stay within each call."""
    ref = tmp_path / "refs" / "h100.csv"
    ref.parent.mkdir()
    first = _write_csv(tmp_path / "a.csv", _ours()[:2])
    result = _cli(["record", str(first), "--to", str(ref), "--label", "session 5 call 1"])
    assert result.exit_code == 0, result.output
    assert "2 row(s) recorded as device_call 'session 5 call 1'" in result.output
    out = tmp_path / "bench-out"
    out.mkdir()
    faster = [{**r, "train_tokens_per_second": r["train_tokens_per_second"] * 2, "host_cpu": "x (16 cores)"}
              for r in _ours()[:2]]
    _write_csv(out / "results.csv", faster)
    assert _cli(["record", str(out), "--to", str(ref), "--label", "session 5 call 2"]).exit_code == 0
    rows = read_results(ref)
    assert [r["device_call"] for r in rows] == ["session 5 call 1"] * 2 + ["session 5 call 2"] * 2
    assert [r.get("host_cpu") for r in rows] == [None, None, "x (16 cores)", "x (16 cores)"]  # added, blank before
    ratios = [r["train_tokens_per_second_vs_baseline"] for r in add_baseline_ratios(rows)]
    assert ratios == [1.0, round(3200 / 2800, 4)] * 2  # each call against its own baseline
    assert not list(ref.parent.glob("*.tmp"))


def test_record_refuses_what_is_not_a_results_csv(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    result = _cli(["record", str(tmp_path / "notes.csv"), "--to", str(tmp_path / "ref.csv"), "--label", "x"])
    assert result.exit_code == 2 and "not a benchmark results file" in result.output
    result = _cli(["record", str(tmp_path), "--to", str(tmp_path / "ref.csv"), "--label", "x"])
    assert result.exit_code == 2 and "expected a bench results.csv" in result.output
    assert not (tmp_path / "ref.csv").exists()


def test_report_cli_prints_a_markdown_table_for_a_readme(tmp_path):
    results = _write_jsonl(tmp_path / "results.jsonl", _ours())
    shown = _cli(["report", str(results), "--markdown"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith("| framework_config | peft | model | gpus |") and lines[1].startswith("|:---|")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
    assert len(rows) == 6 and all(len(r) == 12 for r in rows.values())
    # tok/s, vs base, the median step's vs base, GiB, mem
    assert rows["accelerated-peft-bnb"][6:11] == ["4,200", "1.50", "1.50", "16.07", "0.86"]
    assert rows["accelerated-peft-autogptq"][5] == "oom"
