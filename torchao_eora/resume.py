"""A streaming job that can be resumed: its shards are written into a hidden sibling of the output directory
(``.OUT.partial``) with a progress file saying which decoder layers are done and which job wrote them.

A job killed at layer 60 of 80 continues from layer 60 with ``resume=True`` (CLI ``--resume``): layers already
written are loaded back compressed, only to compute the next layer's inputs, so the result is the checkpoint an
uninterrupted run writes, bit for bit. The progress file records the source checkpoint (path, file sizes, the
hash of its config.json), the compression config, the dtype and a hash of the calibration tokens: a resume with any
of them changed is refused. Once complete, the directory replaces ``OUT`` atomically, without the progress file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .io_utils import _install, atomic_file, check_output_dir, recover_directory

__all__ = ["PROGRESS_FILE", "PartialJob", "job_identity"]

PROGRESS_FILE = "torchao_eora_progress.json"


def job_identity(source: Path, config, dtype: torch.dtype, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict:
    """What makes two streaming jobs the same: source checkpoint, config, dtype and calibration tokens."""
    from torchao.core.config import config_to_dict

    tokens = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask"):
            if batch.get(key) is not None:
                tokens.update(key.encode() + batch[key].to(torch.int64).contiguous().numpy().tobytes())
    files = {p.name: p.stat().st_size for p in sorted(source.iterdir()) if p.suffix in (".safetensors", ".json")}
    return {
        "source": str(source.resolve()),
        "source files": files,
        "source config.json": hashlib.sha256((source / "config.json").read_bytes()).hexdigest(),
        "config": json.dumps(config_to_dict(config), sort_keys=True),
        "dtype": str(dtype),
        "calibration tokens": tokens.hexdigest(),
    }


class PartialJob:
    """The directory a streaming job writes into, resumable (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, identity: dict, *, resume: bool, sources: Iterable = (),
                 overwrite: bool = False):
        self.out = check_output_dir(out_dir, sources=sources, overwrite=overwrite)
        self.path = self.out.parent / f".{self.out.name}.partial"
        self.identity = identity
        progress = self.path / PROGRESS_FILE
        if resume:
            if not progress.is_file():
                raise ValueError(f"nothing to resume: no partial job for {self.out} (expected {progress}); run without "
                                 "--resume")
            saved = json.loads(progress.read_text())
            differs = [k for k in identity if saved.get("job", {}).get(k) != identity[k]]
            if differs:
                raise ValueError(f"the partial job in {self.path} was made with another {', '.join(differs)}: run "
                                 "without --resume to start over")
            self.layers_done = int(saved["layers_done"])
        else:  # a fresh job: what a killed one left is not ours to continue
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            self.layers_done = 0
            self._save()

    def written(self, index: int) -> bool:
        """Whether decoder layer ``index`` is on disk already."""
        return index < self.layers_done

    def layer_written(self, index: int) -> None:
        """Record that layer ``index``'s shard is complete (after the shard itself is on disk)."""
        self.layers_done = index + 1
        self._save()

    def discard_if_empty(self) -> None:
        """Remove the directory if no layer was written (a job that failed on its settings)."""
        if self.layers_done == 0:
            shutil.rmtree(self.path, ignore_errors=True)

    def finish(self) -> Path:
        """Install the complete directory as the output (atomically) and return its path."""
        (self.path / PROGRESS_FILE).unlink()
        recover_directory(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _install(self.path, self.out)  # afterwards self.path holds the previous output, or nothing
        shutil.rmtree(self.path, ignore_errors=True)
        return self.out

    def _save(self) -> None:
        with atomic_file(self.path / PROGRESS_FILE) as tmp:
            tmp.write_text(json.dumps({"job": self.identity, "layers_done": self.layers_done}, indent=2) + "\n")
