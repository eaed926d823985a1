"""Where glibc's heap puts allocations, tuned for a long layer-by-layer job (no-ops off glibc).

A long job that keeps some tensors for many layers (moments, compressed weights, the hidden states) and makes many
short-lived ones (activations, solver temporaries) fragments glibc's heap when both come from it: the peak resident
size then grows from layer to layer. Allocations of 1 MiB or more are therefore mmapped (their pages go back to the
OS on free), except inside the forward passes, whose activations are all freed by the pass's end and would
otherwise each pay the page faults of a fresh mapping (SmolLM2's forward: 37% slower with every activation mapped).
"""

from __future__ import annotations

import contextlib
import ctypes

__all__ = [
    "LONG_LIVED_BYTES", "long_lived_allocations", "release_free_memory", "set_mmap_threshold", "transient_allocations",
]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LONG_LIVED_BYTES = 1 << 20  # mmapped from this size on: freed pages go back to the OS at once
_TRANSIENT_BYTES = 32 << 20  # glibc's largest threshold: activations below it come from (and return to) the heap
_mmap_threshold = [None]


def set_mmap_threshold(nbytes: int) -> None:
    """glibc serves allocations of ``nbytes`` or more by their own mmap from now on (this also stops glibc from
    raising the threshold by itself as large blocks are freed)."""
    if _mmap_threshold[0] == nbytes:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        return
    _mmap_threshold[0] = nbytes


@contextlib.contextmanager
def _allocations(nbytes: int):
    before = _mmap_threshold[0]
    set_mmap_threshold(nbytes)
    try:
        yield
    finally:
        if before is not None:
            set_mmap_threshold(before)


def transient_allocations():
    """Inside: short-lived activations come from the heap (all freed when the block ends; ``_release_free_memory``
    then hands them back)."""
    return _allocations(_TRANSIENT_BYTES)


def long_lived_allocations():
    """Inside: a tensor that outlives the forward pass (a moment) is mmapped, so it does not pin the heap."""
    return _allocations(LONG_LIVED_BYTES)


def release_free_memory() -> None:
    """Hand the heap memory freed by the last layer back to the OS (glibc keeps it otherwise, and the peak resident
    size of a long job grows with fragmentation); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
