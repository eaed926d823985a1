"""What every benchmark writes beside its numbers: the machine and versions, and an atomic JSON file."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from torchao_eora.io_utils import current_umask


def environment() -> dict:
    """Machine, threads and library versions, for the JSON next to every table."""
    import torchao
    import transformers

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else " (CPU only)"
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores{gpu}",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "torchao": torchao.__version__, "transformers": transformers.__version__,
    }


def write_json(path: str, payload: dict) -> None:
    """Atomic rewrite, so a run killed half-way still leaves every finished row readable."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).resolve().parent, suffix=".tmp")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would make results unreadable to others
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def rows_of_other_models(path: str | None, models: list[str]) -> list[dict]:
    """The rows already in ``path`` (a benchmark's ``--json``) whose model is not in ``models``: a script run one model
    at a time keeps the other models' rows."""
    if not path or not Path(path).exists():
        return []
    return [r for r in json.loads(Path(path).read_text())["rows"] if r["model"] not in models]


def run_cli(argv: list[str], report: Path) -> tuple[dict, float]:
    """One ``torchao-eora`` process with ``--json report`` appended: its summary (``cli --json``) and wall seconds."""
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torchao_eora.cli", *argv, "--json", str(report)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"torchao-eora {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return json.loads(report.read_text()), time.perf_counter() - start
