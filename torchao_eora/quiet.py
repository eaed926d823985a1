"""Silence import-time log lines that are not the user's problem, before torchao is imported.

* torchao tries every ``_C*.so`` it ships; on a CPU-only torch the CUDA kernels (``_C_mxfp8``, ``_C_cutlass_*``)
  cannot load, and it says so on every import.
* torch's pytree warns that torchao registers Enum constants the deprecated way.

Only those exact records are dropped; every other warning of both loggers still shows.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["install_log_filters"]


class _DropRecords(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(f in message for f in self.fragments)


def install_log_filters() -> None:
    """Idempotent: adds each filter once."""
    filters = [("torch.utils._pytree", _DropRecords("is an Enum subclass", "register_constant"))]
    if not torch.cuda.is_available():  # on a GPU machine a kernel library that fails to load is worth seeing
        filters.append(("torchao", _DropRecords("Failed to load", "torchao/_C")))
    for name, new in filters:
        logger = logging.getLogger(name)
        if not any(type(f) is _DropRecords and f.fragments == new.fragments for f in logger.filters):
            logger.addFilter(new)
