"""The command line with bad input: one line `torchao-eora CMD: error: ...`, exit status 2, nothing destroyed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchao_eora import cli


def _quantize(tiny_dir: Path, *flags: str) -> list[str]:
    return ["quantize", "--model", str(tiny_dir), "--compensation", "svd", "--eval-tokens", "0", "--rank", "4",
            "--group-size", "32", *flags]


def _fails_in_one_line(argv: list[str], capsys, *fragments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"torchao-eora {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in last, last
    return last


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- --out never destroys what is not ours -----------------------------------------------------------------------


def test_out_refuses_a_directory_with_the_users_files(tiny_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    (work / "train.py").write_text("print('my work')\n")
    monkeypatch.chdir(work)
    before = _snapshot(work)
    _fails_in_one_line(_quantize(tiny_dir, "--out", "."), capsys, "not a torchao-eora checkpoint", "--overwrite")
    assert _snapshot(work) == before
    assert sorted(os.listdir(tmp_path)) == ["project"]  # no hidden temp directory either


def test_out_refuses_a_file_and_the_source(tiny_dir, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    _fails_in_one_line(_quantize(tiny_dir, "--out", str(target)), capsys, "is a file")
    assert target.read_text() == "keep me"
    before = _snapshot(tiny_dir)
    for out in (tiny_dir, tiny_dir.parent):  # the source itself, or a directory holding it
        _fails_in_one_line(_quantize(tiny_dir, "--out", str(out), "--overwrite"), capsys, "would replace the model")
    assert _snapshot(tiny_dir) == before


def test_out_replaces_our_own_checkpoint_and_overwrite_replaces_others(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_quantize(tiny_dir, "--out", str(out))) == 0
    assert cli.main(_quantize(tiny_dir, "--out", str(out), "--rank", "8")) == 0  # re-running a job is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2\n")
    assert cli.main(_quantize(tiny_dir, "--out", str(other), "--overwrite")) == 0
    assert not (other / "data.csv").exists() and any(other.glob("*.safetensors"))


def test_export_peft_out_is_checked_too(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_quantize(tiny_dir, "--out", str(out))) == 0
    capsys.readouterr()
    _fails_in_one_line(["export-peft", "--model", str(out), "--out", str(out)], capsys, "would replace the model")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("x")
    _fails_in_one_line(["export-peft", "--model", str(out), "--out", str(tmp_path / "adapter")], capsys,
                       "not a torchao-eora checkpoint")
    assert cli.main(["export-peft", "--model", str(out), "--out", str(tmp_path / "peft")]) == 0
    assert cli.main(["export-peft", "--model", str(out), "--out", str(tmp_path / "peft")]) == 0  # ours: replaced


# ---- ordinary input errors: one line, exit 2 ----------------------------------------------------------------------


@pytest.mark.parametrize("flags, fragments", [
    (["--rank", "0"], ["rank must be a positive integer"]),
    (["--bits", "9"], ["bits must be an integer in 2..8"]),
    (["--group-size", "48"], ["group_size 48 does not divide in_features=64"]),
    (["--adapter-bits", "4", "--adapter-group-size", "3"], ["adapter_group_size 3"]),
    (["--quantizer", "none"], ["--quantizer none quantizes nothing"]),
    (["--calib-task", "no_such_task"], ["no_such_task"]),
    (["--output-weighting", "gradient", "--compensation", "svd"], ["output_weighting weights EoRA's residual"]),
    (["--rank-budget", "relative"], ["--rank-budget relative needs the whole model"]),
    (["--preserve", "5", "--rank", "8", "--adapter-bits", "4"], ["multiple of adapter_group_size"]),
])
def test_bad_settings_fail_in_one_line_and_leave_no_output(tiny_dir, tmp_path, capsys, flags, fragments):
    _fails_in_one_line(_quantize(tiny_dir, "--out", str(tmp_path / "out"), *flags), capsys, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value", [
    ("--calib-samples", "0"), ("--calib-batch-size", "0"), ("--seq-len", "1"), ("--eval-tokens", "-1"),
    ("--rank", "two"),
])
def test_bad_numbers_are_argparse_errors(tiny_dir, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_quantize(tiny_dir, flag, value))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {flag}:" in err.strip().splitlines()[-1]


def test_missing_model_fails_in_one_line(tmp_path, capsys):
    _fails_in_one_line(["eval", "--model", str(tmp_path / "nowhere"), "--tasks", ""], capsys, "nowhere")


def test_eval_text_measures_the_users_file_or_says_what_is_wrong(tiny_dir, tmp_path, capsys):
    empty, latin1, text = tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "mine.txt"
    empty.write_text("  \n")
    latin1.write_bytes(b"caf\xe9 " * 20)
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    _fails_in_one_line(["eval", "--model", str(tiny_dir), "--text", str(empty), "--tasks", ""], capsys, "is empty")
    _fails_in_one_line(["eval", "--model", str(tiny_dir), "--text", str(latin1), "--tasks", ""], capsys, "UTF-8")
    _fails_in_one_line(["eval", "--model", str(tiny_dir), "--text", str(tmp_path / "no.txt"), "--tasks", ""],
                       capsys, "no.txt")
    assert cli.main(["eval", "--model", str(tiny_dir), "--text", str(text), "--tasks", "", "--seq-len", "64"]) == 0
    ours = capsys.readouterr().out
    assert cli.main(["eval", "--model", str(tiny_dir), "--tasks", "", "--seq-len", "64", "--eval-tokens", "900"]) == 0
    wiki = capsys.readouterr().out
    assert _ppl(ours) != _ppl(wiki)  # another text, another perplexity


def _ppl(summary: str) -> float:
    """The perplexity in the summary table a command printed last."""
    lines = summary.strip().splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "ppl"])
    header, row = lines[at], lines[at + 2]
    return float(row.split()[header.split().index("ppl")])


# ---- no noise that is not ours ------------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess that imports torch and transformers
def test_help_prints_nothing_but_help():
    result = subprocess.run([sys.executable, "-m", "torchao_eora.cli", "quantize", "--help"],
                            capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert "Failed to load" not in result.stdout and "register_constant" not in result.stdout
    assert "--overwrite" in result.stdout and "--calib-samples" in result.stdout


def test_the_demo_rank_fits_every_smollm2_layer_without_a_warning(caplog):
    """SmolLM2's k_proj/v_proj are 192 x 576: the demo's rank must need no clamping there (no warning)."""
    from torchao_eora import EoRAConfig, RTNConfig
    from torchao_eora.targets import check_targets, module_rank

    config = EoRAConfig(rank=cli.DEMO_RANK, base=RTNConfig(bits=3, group_size=64), adapter_bits=cli.DEFAULT_ADAPTER_BITS)
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    assert all(module_rank(config, *shape) == cli.DEMO_RANK for shape in shapes.values())
    with caplog.at_level("WARNING"):
        check_targets({n: torch.nn.Linear(i, o, bias=False) for n, (o, i) in shapes.items()}, config)
    assert not caplog.records


def test_json_summary_holds_what_the_table_printed(tiny_dir, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(tiny_dir), "--tasks", "", "--seq-len", "64", "--eval-tokens", "900",
                     "--json", str(report)]) == 0
    assert json.loads(report.read_text())["rows"][0]["ppl"] == pytest.approx(_ppl(capsys.readouterr().out), rel=1e-3)
    report = tmp_path / "quantize.json"
    assert cli.main(_quantize(tiny_dir, "--out", str(tmp_path / "out"), "--json", str(report))) == 0
    summary = json.loads(report.read_text())
    assert summary["compressed_share"] > 0.5 and summary["peak_rss_gib"] > 0 and "compress" in summary["phases_s"]


def test_json_summary_has_each_tasks_per_doc_outcomes(tiny_dir, tmp_path, monkeypatch):
    """``<task>_correct`` holds one 0/1 per doc, in doc order, and agrees with the accuracy beside it."""
    from test_data_eval import write_requests
    from torchao_eora import eval as ev

    path = tmp_path / "requests.jsonl.gz"
    write_requests(path, [("Q:", ["ab", "cd", "ef"], i % 3) for i in range(12)])
    monkeypatch.setattr(ev, "_requests_path", lambda task: path)
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(tiny_dir), "--tasks", "fake", "--eval-tokens", "0",
                     "--json", str(report)]) == 0
    row = json.loads(report.read_text())["rows"][0]
    assert len(row["fake_correct"]) == 12 and set(row["fake_correct"]) <= {"0", "1"}
    assert row["fake"] == pytest.approx(row["fake_correct"].count("1") / 12)
