"""A streaming job killed mid-way continues with resume=True (CLI --resume) from its last written layer, and the
result is the uninterrupted run's checkpoint, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import char_tokenizer, tiny_causal_lm, token_batches
from torchao_eora import EoRAConfig, RTNConfig
from torchao_eora.resume import PROGRESS_FILE, PartialJob
from torchao_eora.streaming import quantize_checkpoint

CONFIG = EoRAConfig(rank=4, base=RTNConfig(bits=4, group_size=16), adapter_bits=4, adapter_group_size=4)


class _Killed(Exception):
    pass


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src"
    tiny_causal_lm("qwen3_moe", layers=3).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_a_job_resumed_after_a_failure_writes_the_uninterrupted_checkpoint(tmp_path, source, monkeypatch):
    batches = token_batches(2, seed=2)
    quantize_checkpoint(source, tmp_path / "whole", CONFIG, batches, device="cpu", progress=False)

    original = PartialJob.layer_written

    def dies_after_layer_1(self, index):
        original(self, index)
        if index == 1:
            raise _Killed

    monkeypatch.setattr(PartialJob, "layer_written", dies_after_layer_1)
    with pytest.raises(_Killed):
        quantize_checkpoint(source, tmp_path / "out", CONFIG, batches, device="cpu", progress=False)
    partial = tmp_path / ".out.partial"
    assert json.loads((partial / PROGRESS_FILE).read_text())["layers_done"] == 2 and not (tmp_path / "out").exists()
    monkeypatch.setattr(PartialJob, "layer_written", original)

    with pytest.raises(ValueError, match="another config: run without --resume"):
        quantize_checkpoint(source, tmp_path / "out", EoRAConfig(rank=8, base=RTNConfig(3, 16)), batches,
                            device="cpu", progress=False, resume=True)
    with pytest.raises(ValueError, match="another calibration tokens"):
        quantize_checkpoint(source, tmp_path / "out", CONFIG, token_batches(2, seed=3), device="cpu",
                            progress=False, resume=True)
    quantize_checkpoint(source, tmp_path / "out", CONFIG, batches, device="cpu", progress=False, resume=True)
    assert _files(tmp_path / "out") == _files(tmp_path / "whole") and not partial.exists()


def test_resume_without_a_partial_job_says_what_to_do(tmp_path, source):
    with pytest.raises(ValueError, match="nothing to resume.*run without --resume"):
        quantize_checkpoint(source, tmp_path / "out", CONFIG, token_batches(1), device="cpu", progress=False,
                            resume=True)


@pytest.mark.slow
def test_the_cli_resumes_a_killed_process(tmp_path, source):
    argv = [sys.executable, "-m", "torchao_eora.cli", "quantize", "--model", str(source), "--rank", "4",
            "--group-size", "16", "--adapter-group-size", "4", "--calib-samples", "4", "--seq-len", "32",
            "--eval-tokens", "0", "--tasks", ""]
    env = {**os.environ, "TORCHAO_EORA_DEBUG": "1"}
    subprocess.run(argv + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    job = subprocess.Popen(argv + ["--out", str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    progress = tmp_path / ".out.partial" / PROGRESS_FILE
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["layers_done"] >= 1:
            job.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job ended before layer 1 was written: nothing was killed"
    subprocess.run(argv + ["--out", str(tmp_path / "out"), "--resume"], check=True, env=env, capture_output=True)
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")
