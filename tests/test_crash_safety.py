"""Saves survive kills and races, leave no hidden leftovers, and the same job gives the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchao_eora import io_utils, load_pretrained

TESTS = Path(__file__).parent

# Builds a tiny calibrated EoRA model (the same for every seed-0 run) and saves it; see the tests for the modes.
_JOB = r'''
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(int(sys.argv[2]))
from helpers import tiny_llama, token_batches
from torchao.quantization import quantize_
from torchao_eora import EoRAConfig, GPTQConfig, calibrate, eora_config, io_utils, save_pretrained
out, mode = sys.argv[1], sys.argv[3]
model = tiny_llama(hidden=128)
config = EoRAConfig(rank=8, base=GPTQConfig(bits=3, group_size=32, act_order=True), adapter_bits=4,
                    adapter_group_size=8)
quantize_(model, eora_config(calibrate(model, token_batches(4, 4, 32, seed=1), config, progress=False)))
if mode == "die-between-renames":  # the fallback path (no atomic exchange), killed at its worst moment
    io_utils._exchange = lambda a, b: False
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            os._exit(9)
    io_utils.os.rename = rename
print("ready", flush=True)
for _ in range(1000 if mode == "loop" else 1):
    save_pretrained(model, out, config)
'''


def _job(tmp_path: Path, out: Path, threads: int = 1, mode: str = "once") -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(_JOB.format(tests=str(TESTS)))
    return subprocess.Popen([sys.executable, str(script), str(out), str(threads), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.slow  # subprocesses that each import torch and compress a model
def test_same_job_same_bytes_with_one_and_two_threads(tmp_path):
    jobs = [_job(tmp_path, tmp_path / f"t{threads}", threads) for threads in (1, 2)]
    assert [j.wait(timeout=300) for j in jobs] == [0, 0]
    one, two = _files(tmp_path / "t1"), _files(tmp_path / "t2")
    assert list(one) == list(two) and "model.safetensors" in one
    assert one == two, "the checkpoint depends on the thread count or on the process"


@pytest.mark.slow  # subprocesses that each import torch and compress a model
def test_a_kill_between_the_fallback_renames_is_recovered_on_load(tmp_path):
    out = tmp_path / "out"
    assert _job(tmp_path, out).wait(timeout=300) == 0
    before = _files(out)
    assert _job(tmp_path, out, mode="die-between-renames").wait(timeout=300) == 9
    assert not out.exists() and any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
    load_pretrained(out)  # puts the complete previous checkpoint back first
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out"]  # and removes the dead one's leftovers


@pytest.mark.slow  # subprocesses that each import torch and compress a model
def test_killed_saves_never_leave_a_broken_checkpoint_and_leftovers_are_cleaned(tmp_path):
    out = tmp_path / "out"
    assert _job(tmp_path, out).wait(timeout=300) == 0
    reference = _files(out)
    for delay in (0.05, 0.2, 0.4, 0.7, 1.1):
        job = _job(tmp_path, out, mode="loop")
        assert job.stdout.readline().strip() == "ready"
        time.sleep(delay)
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert _files(out) == reference, f"a kill after {delay}s left {out} incomplete or changed"
    io_utils.recover_directory(out)  # what the next save or load does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out"]


@pytest.mark.slow  # subprocesses that each import torch and compress a model
def test_two_processes_saving_one_directory_end_with_one_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    jobs = [_job(tmp_path, out, mode="loop") for _ in range(2)]
    for job in jobs:
        assert job.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # both saving over each other in a loop
    for job in jobs:
        job.send_signal(signal.SIGKILL)
        job.wait()
    io_utils.recover_directory(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out"]
    model = load_pretrained(out)
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_recover_leaves_a_live_processs_work_alone(tmp_path):
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"  # the parent process is alive
    dead = tmp_path / ".out.tmp-999999999-abc"
    live.mkdir()
    dead.mkdir()
    io_utils.recover_directory(tmp_path / "out")
    assert live.exists() and not dead.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_atomic_exchange_is_used_here(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    assert io_utils._exchange(a, b) and (b / "x").read_text() == "a"
