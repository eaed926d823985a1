"""Every benchmark script runs end to end on a tiny model, so none of them can rot unnoticed (the numbers are
not checked here: the scripts themselves are the measurement)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

pytestmark = pytest.mark.slow


def _main(script: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their sibling results_io
    return runpy.run_path(str(BENCHMARKS / script), run_name="benchmark")["main"]


def _rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())["rows"]
    return list(rows.values()) if isinstance(rows, dict) else rows


def test_quality(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "quality.json"
    assert _main("quality.py", monkeypatch)([
        "--model", str(tiny_dir), "--bits", "3", "--group-size", "32", "--ranks", "4", "--calib-samples", "2",
        "--seq-len", "32", "--eval-tokens", "256", "--tasks", "--rank-budgets", "uniform", "global",
        "--refine-rounds", "0", "1", "--json", str(out),
    ]) == 0
    rows = _rows(out)
    assert {r["method"] for r in rows} == {"fp", "none", "svd", "eora"}
    eora = {(r.get("rank_budget", "uniform"), r.get("refine_rounds", 0)) for r in rows if r["method"] == "eora"}
    assert eora == {("uniform", 0), ("uniform", 1), ("global", 0), ("global", 1)}
    assert all(r["ppl"] > 1 for r in rows)


def test_quality_paper_suite_rows_per_value_moment(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "paper.json"
    assert _main("quality.py", monkeypatch)([
        "--model", str(tiny_dir), "--suite", "paper", "--compressions", "sparsegpt-2:4", "--methods", "eora",
        "--value-moments", "auto", "plain", "--ranks", "4", "--group-size", "32", "--calib-samples", "2",
        "--seq-len", "32", "--eval-tokens", "256", "--tasks", "--json", str(out),
    ]) == 0
    eora = [r for r in _rows(out) if r["method"] == "eora"]
    assert [r.get("value_moment", "auto") for r in eora] == ["auto", "plain"]
    assert eora[0]["ppl"] != eora[1]["ppl"]  # the v_proj residual differs: attention-weighted vs plain


def test_finetune(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "finetune.json"
    assert _main("finetune.py", monkeypatch)([
        "--model", str(tiny_dir), "--group-size", "32", "--rank", "4", "--steps", "2", "--batch-size", "1",
        "--seq-len", "16", "--calib-samples", "2", "--calib-seq-len", "32", "--eval-tokens", "128",
        "--eval-seq-len", "32", "--no-compile", "--json", str(out),
    ]) == 0
    assert len(_rows(out)) >= 3  # the three starts (lora, svd, eora), at least


def test_speed(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), "--models", "smollm2-135m", "--tokens", "1",
                    "--modes", "eager", "--no-decode", "--min-run-time", "0.01", "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    layers = json.loads(out.read_text())["layers"]
    assert layers and all(r["M"] == 1 and r["mode"] == "eager" for r in layers)


@pytest.mark.real_model  # the scale benchmark tokenizes with SmolLM2's tokenizer; gptq_study loads the model
def test_scale_and_gptq_study(tmp_path):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), "--only", "big", "--size", "tiny",
                    "--calib-samples", "2", "--cache-dir", str(tmp_path), "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    big = _rows(out)[0]
    assert big["peak_rss_gib"] > 0 and big["written_gib"] > 0 and {"forward", "solve"} <= set(big["phases_s"])
    study = subprocess.run([sys.executable, str(BENCHMARKS / "gptq_study.py"), "--runs", "rtn", "gptq",
                            "--n-samples", "2", "--seq-len", "64", "--eval-tokens", "128", "--no-save"],
                           check=True, capture_output=True, text=True, timeout=600)
    assert "gptq" in study.stdout


def test_moe_study(tmp_path, monkeypatch):
    out = tmp_path / "moe.json"
    assert _main("moe_study.py", monkeypatch)(["--windows", "4", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert sum(row["tokens per expert"]) == 4 * 64 * 2 and row["eora weighted down"]["block"] < 1


def test_screen_rows_are_replaced_by_name(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "screen.json"
    main = _main("screen.py", monkeypatch)
    tiny = "--seq-len 32 --group-size 32 --rank 8 --adapter-group-size 8"
    main(["--model", str(tiny_dir), "--rows", f"default={tiny}", f"anchored={tiny} --target anchored",
          "--calib-samples", "2", "--eval-tokens", "256", "--json", str(out)])
    first = _rows(out)
    assert [r["name"] for r in first] == ["default", "anchored"] and first[0]["ppl"] != first[1]["ppl"]
    main(["--model", str(tiny_dir), "--rows", f"default={tiny}", "original=--seq-len 32", "--calib-samples", "2",
          "--eval-tokens", "256", "--json", str(out)])
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["anchored", "default", "original"]
    assert rows[-1]["command"].startswith("torchao-eora eval") and rows[-1]["ppl"] != rows[1]["ppl"]


def test_served_bytes(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "served.json"
    _main("served_bytes.py", monkeypatch)(["--models", str(tiny_dir), "--ranks", "8", "--default", "16:4",
                                           "--calib-samples", "2", "--eval-tokens", "256", "--json", str(out)])
    full, int4 = _rows(out)
    assert (full["max_lora_rank"], int4["max_lora_rank"]) == (8, 16)  # vLLM's slots
    assert int4["vllm_bf16_mb"] == 2 * full["vllm_bf16_mb"] and int4["our_adapter_mb"] < int4["vllm_bf16_mb"]
    assert full["bf16_modules"] == 14 and abs(full["ppl_bf16_adapters"] / full["ppl"] - 1) < 0.01


def test_solve_scaling(tmp_path):
    out = tmp_path / "solve.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "solve_scaling.py"), "--shapes", "tiny", "--rank", "16",
                    "--calib-windows", "2", "--forward-windows", "1", "--exact", "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    row = _rows(out)[0]
    assert row["shape"] == "tiny" and row["solve_s"] > 0 and row["forward_s"] > 0 and row["peak_rss_gib"] > 0
    assert len(row["modules"]) == 7 and all(abs(m["objective_rel_diff"]) < 1e-4 for m in row["modules"])


def test_kernel_bench_dry_run(tmp_path):
    """The GPU script's kernel part on the CPU (interpreter, tiny shapes): every path runs and matches fp64."""
    out = tmp_path / "kernels.jsonl"
    subprocess.run([sys.executable, str(BENCHMARKS / "kernel_bench.py"), "--dry-run", "--json", str(out)],
                   check=True, capture_output=True, timeout=900)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    products = [r for r in rows if "M" in r]
    assert {r["kernel"] for r in products} == {"bf16", "ours"} and {r["bits"] for r in products} == {16, 4, 3}
    assert all(r["max_rel_err"] < 1e-5 and "us" not in r for r in products)  # fp32 on CPU; no timings on a dry run


def test_sizes_adapter_specs(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "sizes.json"
    main = _main("sizes.py", monkeypatch)
    main(["--model", str(tiny_dir), "--bits", "3", "--group-size", "32", "--adapters", "bf16 r8", "int4 g8 r8",
          "int3 g8 r8", "--json", str(out)])
    bf16, int4, int3 = (r["adapter_bytes"] for r in _rows(out)[1:])
    # per value: 16 bits in bf16; N bits + a bf16 scale and an int8 zero point per group of 8 when quantized
    assert int4 * 16 == bf16 * 7 and int3 * 7 == int4 * 6
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_dir), "--adapters", "int4 r8"])


def test_adapter_quantization(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "aq.json"
    _main("adapter_quantization.py", monkeypatch)(["--model", str(tiny_dir), "--layers", "0", "--adapters",
                                                   "int4 g8 r8", "--calib-samples", "2", "--seq-len", "32",
                                                   "--json", str(out)])
    row = _rows(out)[0]
    assert row["modules"] == 7 and row["full precision"] < row["base alone"]
    assert row["full precision"] < min(row["as solved"], row["B re-solved"], row["quantization-aware"])


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """A benchmark's main runs in the test process: it must not switch autograd off for the tests that follow."""
    yield
    assert torch.is_grad_enabled()
