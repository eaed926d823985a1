"""The end-to-end job shared by the CLI and the benchmarks: calibration data -> calibrate -> quantize_ -> evaluate."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from .calibration import Calibration, calibrate, find_decoder_layers
from .config import EoRAConfig
from .targets import check_targets
from .data import bbc_articles, calibration_batches, token_stream, wikipedia_split
from .eval import perplexity, zero_shot

__all__ = ["CALIBRATION_SOURCES", "calibration_texts", "compress", "evaluate", "Timer", "peak_memory_gib"]

CALIBRATION_SOURCES = ("wikipedia", "bbc")


def calibration_texts(source: str) -> list[str]:
    """Calibration text: Wikipedia articles disjoint from the evaluation ones, or BBC News (another domain)."""
    if source == "wikipedia":
        return wikipedia_split()[0]
    if source == "bbc":
        return bbc_articles()
    raise ValueError(f"calibration source must be one of {CALIBRATION_SOURCES}, got {source!r}")


def peak_memory_gib() -> float:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class Timer:
    """Wall-clock seconds per named phase."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def compress(
    model: torch.nn.Module,
    tokenizer,
    config: EoRAConfig,
    *,
    source: str = "wikipedia",
    n_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    mode: str = "sequential",
    calibration: Calibration | None = None,
    timer: Timer | None = None,
    progress: bool = True,
) -> Calibration | None:
    """Compress ``model`` in place with ``config``; calibrates first unless it needs no data or ``calibration`` is given.

    Returns the calibration used (None for data-free methods).
    """
    timer = timer or Timer()
    needs_data = config.method == "eora" or getattr(config.base, "needs_calibration", False)
    if needs_data and calibration is None:
        with timer("calibrate"):
            batches = calibration_batches(tokenizer, calibration_texts(source), n_samples, seq_len, batch_size)
            calibration = calibrate(model, batches, config, mode=mode, progress=progress)
    with timer("quantize"):
        if calibration is not None:
            config = replace(config, calibration=calibration.bind(model))
        prefix, layers = find_decoder_layers(model)
        targets = {f"{prefix}.{n}": m for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)}
        if not targets:
            raise ValueError(f"no torch.nn.Linear layers found in {prefix}: nothing to compress")
        check_targets(targets, config)  # every layer, before the first is changed
        # One decoder layer at a time, for a progress bar; lm_head and embeddings stay as they are.
        for layer in tqdm(layers, desc=f"compressing ({config.describe()})", disable=not progress):
            quantize_(layer, config)
    return calibration


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    *,
    eval_tokens: int = 20_000,
    seq_len: int = 512,
    tasks: Sequence[str] = ("piqa", "arc_easy", "hellaswag"),
    task_limit: int | None = 500,
    timer: Timer | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Held-out Wikipedia perplexity (articles calibration never sees) plus zero-shot accuracies."""
    timer = timer or Timer()
    metrics: dict[str, float] = {}
    with timer("evaluate"):
        tokens = token_stream(tokenizer, wikipedia_split()[1])
        metrics["ppl"] = perplexity(model, tokens, seq_len=seq_len, max_tokens=eval_tokens, progress=progress)
        if tasks:
            metrics.update(zero_shot(model, tokenizer, tasks=tuple(tasks), limit=task_limit, progress=progress))
    return metrics
