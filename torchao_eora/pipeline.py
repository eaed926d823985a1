"""The end-to-end job shared by the CLI and the benchmarks: calibration text -> the sequential pass -> evaluate."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Sequence

import torch
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from .calibration import Calibration
from .config import EoRAConfig
from .coverage import check_coverage
from .experts import check_experts, compress_experts, expert_weights, find_experts, use_eager_experts
from .sequential import _linears, calibrate, compress_sequential, find_decoder_layers
from .targets import check_targets
from .data import bbc_articles, bos_token_id, calibration_batches, token_stream, wikipedia_split
from .eval import perplexity, task_calibration_texts, zero_shot
from .timing import Timer, peak_memory_gib

log = logging.getLogger(__name__)

__all__ = ["CALIBRATION_SOURCES", "calibration_texts", "compress_model", "evaluate", "Timer", "peak_memory_gib"]

CALIBRATION_SOURCES = ("wikipedia", "bbc")


def calibration_texts(source: str) -> list[str]:
    """Calibration text: Wikipedia articles disjoint from the evaluation ones, BBC News (another domain), or
    ``"task:NAME"``: the calibration half of a zero-shot task's docs, questions with their correct answers
    (``eval.task_calibration_texts``; score the other half with ``held_out_tasks``)."""
    if source == "wikipedia":
        return wikipedia_split()[0]
    if source == "bbc":
        return bbc_articles()
    if source.startswith("task:") and source[5:]:
        return task_calibration_texts(source[5:])
    raise ValueError(f"calibration source must be one of {CALIBRATION_SOURCES} or task:NAME (e.g. task:piqa), "
                     f"got {source!r}")


def compress_model(
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
    keep_statistics: bool = True,
    timer: Timer | None = None,
    progress: bool = True,
    allow_partial: bool = False,
) -> Calibration | None:
    """Compress ``model`` in place with ``config``, every decoder linear once; lm_head and embeddings stay as they are.

    Calibrated configs run the sequential pass (``compress_sequential``) unless ``mode="one-shot"`` or statistics
    are given (``calibration``); data-free ones go through ``quantize_`` layer by layer. Every target is checked
    before the first one changes; a large weight holder that would stay uncompressed is an error unless
    ``allow_partial``. Returns the calibration used (None for data-free methods).
    """
    timer = timer or Timer()
    needs_data = config.compensation == "eora" or getattr(config.base, "needs_calibration", False)
    if needs_data and calibration is None:
        batches = calibration_batches(tokenizer, calibration_texts(source), n_samples, seq_len, batch_size)
        if mode == "sequential":
            calib = compress_sequential(model, batches, config, keep_statistics=keep_statistics, timer=timer,
                                        progress=progress, allow_partial=allow_partial)
            return calib.bind(model)
        with timer("moments"):
            calibration = calibrate(model, batches, config, mode=mode, progress=progress, allow_partial=allow_partial)
    with timer("compress"):
        if calibration is not None:
            config = replace(config, calibration=calibration.bind(model))
        prefix, layers = find_decoder_layers(model)
        check_targets(_linears(layers, prefix + "."), config)  # every layer, before the first is changed
        experts = find_experts(layers, prefix + ".")
        check_experts(experts, config)
        targets = {f"{name}.weight": m.weight for name, m in _linears(layers, prefix + ".").items()}
        targets.update(expert_weights(experts))
        check_coverage(model, layers, prefix, targets, allow_partial=allow_partial)
        for layer in tqdm(layers, desc=f"compressing ({config.describe()})", disable=not progress):
            quantize_(layer, config)  # one decoder layer at a time, for a progress bar
        if experts and needs_data:
            log.warning("statistics given or one-shot: the experts get no routed statistics (identity moment, plain "
                        "SVD residual); sequential calibration measures each expert's routed tokens")
        for name, module in experts.items():  # quantize_ visits linears only
            no_routed_statistics = Calibration({}, {}, "one-shot") if needs_data else None
            compress_experts(name, module, replace(config, calibration=None), no_routed_statistics)
        if experts:
            use_eager_experts(model)
    return calibration


def _dense_copy_fits(model: torch.nn.Module) -> bool:
    """Whether a dense copy of every compressed weight fits in half the memory available now: evaluation then
    dequantizes each weight once (``ops.reuse_dequantized``: same outputs) instead of on every forward, which on a
    CPU costs more than the matmuls (a 3-bit Qwen2.5-1.5B: minutes per task)."""
    from .tensor import QuantWithLowRank

    need = sum(p.numel() * p.dtype.itemsize for p in model.parameters() if isinstance(p, QuantWithLowRank))
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return 0 < need <= available // 2


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    *,
    eval_tokens: int = 20_000,
    seq_len: int = 512,
    tasks: Sequence[str] = ("piqa", "arc_easy", "hellaswag"),
    task_limit: int | None = 500,
    texts: Sequence[str] | None = None,
    held_out_tasks: bool = False,
    timer: Timer | None = None,
    progress: bool = True,
    outcomes: dict[str, list[bool]] | None = None,
) -> dict[str, float]:
    """Perplexity on ``texts`` (default: the held-out Wikipedia articles calibration never sees) plus zero-shot
    accuracies and their standard errors (``outcomes``, when given, receives the per-doc correctness of each task).
    Windows start with BOS when the tokenizer adds one (Gemma)."""
    from .ops import reuse_dequantized

    timer = timer or Timer()
    metrics: dict[str, float] = {}
    reuse = reuse_dequantized() if _dense_copy_fits(model) else contextlib.nullcontext()
    with timer("evaluate"), reuse:
        if eval_tokens != 0:  # 0: zero-shot tasks only
            tokens = token_stream(tokenizer, list(texts) if texts is not None else wikipedia_split()[1])
            metrics["ppl"] = perplexity(model, tokens, seq_len=seq_len, max_tokens=eval_tokens, progress=progress,
                                        bos_token_id=bos_token_id(tokenizer))
        if tasks:
            metrics.update(zero_shot(model, tokenizer, tasks=tuple(tasks), limit=task_limit, progress=progress,
                                     held_out=held_out_tasks, outcomes=outcomes))
    return metrics
