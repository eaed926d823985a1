"""Tests for torchao_eora.data and torchao_eora.eval.

Fast tests use a byte-level fake tokenizer, a tiny random Llama and a hand-made bigram model; the
``real_model`` test loads the bundled SmolLM2-135M.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torchao_eora import data, eval as ev  # noqa: E402

PAD, EOS, OFFSET = 0, 1, 2  # byte b is token b + OFFSET


class ByteTokenizer:
    """Minimal tokenizer with the interface data/eval use: one token per UTF-8 byte."""

    pad_token_id = PAD
    eos_token_id = EOS
    vocab_size = 256 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + OFFSET for b in text.encode()]

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(t) for t in texts]}


class BosByteTokenizer(ByteTokenizer):
    """Starts every text with a BOS (byte 0xFF, never part of UTF-8 text), as Gemma's tokenizer does."""

    bos_token_id = 0xFF + OFFSET

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.bos_token_id] * add_special_tokens + super().encode(text)

    def __call__(self, texts, add_special_tokens: bool = False):  # one text: a flat list, as Hugging Face's
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}


def tok_id(ch: str) -> int:
    return ord(ch) + OFFSET


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


class BigramLM(torch.nn.Module):
    """Logits depend only on the current token: ``logits[t] = table[input_ids[t]]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.table[input_ids])


def gold_loving_model() -> BigramLM:
    """Strongly predicts the chain ``':' -> ' ' -> 'x' -> 'y' -> 'z'`` and nothing else."""
    table = torch.zeros(ByteTokenizer.vocab_size, ByteTokenizer.vocab_size)
    for prev, nxt in zip(": xy", " xyz"):
        table[tok_id(prev), tok_id(nxt)] = 20.0
    return BigramLM(table)


def write_requests(path, docs: list[tuple[str, list[str], int]]) -> None:
    """Write OLMo-style rc requests: one row per choice, shuffled idx order, plus unconditional rows."""
    rows = []
    for doc_id, (context, choices, gold) in enumerate(docs):
        for idx in reversed(range(len(choices))):  # file order must not matter
            rows.append(
                {
                    "request_type": "loglikelihood",
                    "doc": {"query": context, "choices": choices, "gold": gold},
                    "request": {"context": context, "continuation": " " + choices[idx]},
                    "idx": idx,
                    "doc_id": doc_id,
                    "label": gold,
                }
            )
            rows.append({**rows[-1], "doc_id": 1_000_000 + doc_id, "request": {"context": "", "continuation": "?"}})
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------- data


def test_token_stream_separates_texts_with_eos():
    stream = data.token_stream(ByteTokenizer(), ["ab", "", "c"])
    assert stream.dtype == torch.long
    assert stream.tolist() == [tok_id("a"), tok_id("b"), EOS, EOS, tok_id("c")]


def test_calibration_batches_shapes_and_determinism():
    tok = ByteTokenizer()
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]
    stream = data.token_stream(tok, texts)
    batches = data.calibration_batches(tok, texts, n_samples=10, seq_len=16, batch_size=4, seed=3)
    assert [b["input_ids"].shape for b in batches] == [(4, 16), (4, 16), (2, 16)]
    for b in batches:
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
    # Every sample is a contiguous window of the stream.
    windows = stream.unfold(0, 16, 1)
    for row in torch.cat([b["input_ids"] for b in batches]):
        assert (windows == row).all(-1).any()

    again = data.calibration_batches(tok, texts, n_samples=10, seq_len=16, batch_size=4, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = data.calibration_batches(tok, texts, n_samples=10, seq_len=16, batch_size=4, seed=4)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))


def test_calibration_batches_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="n_samples"):
        data.calibration_batches(tok, ["some text"], n_samples=0, seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        data.calibration_batches(tok, ["short"], n_samples=1, seq_len=6)
    # Exactly seq_len tokens is enough: the single possible window.
    (batch,) = data.calibration_batches(tok, ["short"], n_samples=2, seq_len=5)
    assert batch["input_ids"].tolist() == [data.token_stream(tok, ["short"]).tolist()] * 2


def test_wikipedia_split_disjoint_and_complete():
    articles = data.wikipedia_articles()
    assert len(articles) == 106
    assert all(a.strip() for a in articles)
    assert not any("[[" in a or "{{" in a or "'''" in a for a in articles)  # markup stripped
    calibration, evaluation = data.wikipedia_split()
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(articles)
    assert data.wikipedia_split() == (calibration, evaluation)  # deterministic


def test_bbc_articles():
    articles = data.bbc_articles()
    assert len(articles) == 2225
    assert all(a.strip() for a in articles)
    assert not set(articles) & set(data.wikipedia_articles())


def test_smollm2_gguf_path():
    path = data.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


# ---------------------------------------------------------------------------------------------- eval


def test_perplexity_matches_hand_computed(tiny_llama):
    torch.manual_seed(1)
    tokens = torch.randint(OFFSET, ByteTokenizer.vocab_size, (23,))
    # Windows of 8, 8 and a 7-token tail; batch_size 2 puts the two full windows in one batch.
    got = ev.perplexity(tiny_llama, tokens, seq_len=8, batch_size=2, progress=False)

    nll, count = 0.0, 0
    with torch.no_grad():
        for window in tokens.split(8):
            logp = tiny_llama(input_ids=window[None]).logits[0].log_softmax(-1)
            nll -= logp[:-1].gather(-1, window[1:, None]).sum().item()
            count += window.numel() - 1
    assert count == 20
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    # max_tokens truncates before windowing.
    first = ev.perplexity(tiny_llama, tokens, seq_len=8, max_tokens=8, progress=False)
    with torch.no_grad():
        logits = tiny_llama(input_ids=tokens[None, :8]).logits[0]
    assert first == pytest.approx(math.exp(F.cross_entropy(logits[:-1], tokens[1:8]).item()), rel=1e-5)


def test_bos_starts_every_calibration_and_perplexity_window_and_every_request(tiny_llama):
    bos_tok, bos = BosByteTokenizer(), BosByteTokenizer.bos_token_id
    assert data.bos_token_id(bos_tok) == bos and data.bos_token_id(ByteTokenizer()) is None
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"]
    stream = data.token_stream(bos_tok, texts)
    assert bos not in stream.tolist()  # the stream itself has no BOS: only windows start with one
    for batch in data.calibration_batches(bos_tok, texts, n_samples=5, seq_len=8, batch_size=2):
        ids = batch["input_ids"]
        assert ids.shape[1] == 8 and (ids[:, 0] == bos).all()
        for row in ids[:, 1:].tolist():  # 7 consecutive stream tokens
            assert any(stream[s:s + 7].tolist() == row for s in range(stream.numel() - 6))

    tokens = torch.randint(OFFSET, ByteTokenizer.vocab_size - 1, (20,))
    got = ev.perplexity(tiny_llama, tokens, seq_len=8, batch_size=2, progress=False, bos_token_id=bos)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in tokens.split(7):  # 7, 7 and a 6-token tail, each behind a BOS
            window = torch.cat([torch.tensor([bos]), chunk])
            logp = tiny_llama(input_ids=window[None]).logits[0].log_softmax(-1)
            nll -= logp[:-1].gather(-1, window[1:, None]).sum().item()
            count += chunk.numel()
    assert count == 20
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)

    ((with_bos, _),) = ev.loglikelihoods(tiny_llama, bos_tok, [("Q:", " a")], progress=False)
    ids = torch.tensor([[bos, tok_id("Q"), tok_id(":"), tok_id(" ")]])  # continuation " a": two byte tokens
    with torch.no_grad():
        logp = tiny_llama(input_ids=ids).logits[0, -2:].log_softmax(-1)
    assert with_bos == pytest.approx((logp[0, tok_id(" ")] + logp[1, tok_id("a")]).item(), abs=1e-5)


def test_padding_does_not_change_scores(tiny_llama):
    tok = ByteTokenizer()
    requests = [
        ("Question: what is up?\nAnswer:", " the sky"),
        ("Hi", " there, how are you doing today?"),
        ("A much longer context that forces plenty of right padding onto the others.", " ok"),
        ("Trailing space ", "moves to the continuation"),
    ]
    batched = ev.loglikelihoods(tiny_llama, tok, requests, batch_size=len(requests), progress=False)
    for request, (score, _) in zip(requests, batched):
        ((alone, _),) = ev.loglikelihoods(tiny_llama, tok, [request], batch_size=1, progress=False)
        assert score == pytest.approx(alone, abs=1e-4)
    # A trailing context space is scored as part of the continuation, like lm-eval-harness.
    ((a, _),) = ev.loglikelihoods(tiny_llama, tok, [("Answer: ", "yes")], progress=False)
    ((b, _),) = ev.loglikelihoods(tiny_llama, tok, [("Answer:", " yes")], progress=False)
    assert a == pytest.approx(b, abs=1e-5)


def test_load_task_requests_groups_and_skips_unconditional(tmp_path, monkeypatch):
    path = tmp_path / "requests.jsonl.gz"
    write_requests(path, [("Q1:", ["a", "b"], 1), ("Q2:", ["c", "d", "e"], 2), ("Q3:", ["f", "g"], 0)])
    monkeypatch.setattr(ev, "_requests_path", lambda task: path)
    docs = ev.load_task_requests("fake", limit=2)
    assert [d.doc_id for d in docs] == [0, 1]
    assert docs[1] == ev.Doc(1, ("Q2:",) * 3, (" c", " d", " e"), 2)
    assert len(ev.load_task_requests("fake", limit=None)) == 3


def test_real_request_files_parse():
    docs = ev.load_task_requests("piqa", limit=3)
    assert len(docs) == 3
    assert all(len(d.continuations) == 2 and d.gold in (0, 1) for d in docs)
    assert all(c.startswith(" ") for d in docs for c in d.continuations)


def test_gold_loving_model_scores_perfect_accuracy(tmp_path, monkeypatch):
    path = tmp_path / "requests.jsonl.gz"
    # The gold "xyz" is always the model's favourite, whatever its position and the distractors' lengths.
    write_requests(
        path,
        [("Q:", ["xyz", "abc"], 0), ("Q:", ["a", "xyz", "abcdefgh"], 1), ("Q:", ["cab", "b", "xyz"], 2)],
    )
    monkeypatch.setattr(ev, "_requests_path", lambda task: path)
    metrics = ev.zero_shot(gold_loving_model(), ByteTokenizer(), tasks=("fake",), limit=None, progress=False)
    assert metrics == {"fake": 1.0, "fake_stderr": 0.0, "fake_norm": 1.0}

    # Single-choice (lambada-style) docs score greedy matches: " xyz" is the greedy continuation, " abc" is not.
    write_requests(path, [("Q:", ["xyz"], 0), ("Q:", ["abc"], 0)])
    metrics = ev.zero_shot(gold_loving_model(), ByteTokenizer(), tasks=("lambada",), limit=None, progress=False)
    assert metrics == {"lambada": 0.5, "lambada_stderr": 0.5}  # sqrt(0.5 * 0.5 / (2 - 1))

    # per-doc outcomes, in doc order: the doc the model gets wrong is the second
    outcomes = {}
    ev.zero_shot(gold_loving_model(), ByteTokenizer(), tasks=("lambada",), limit=None, progress=False,
                 outcomes=outcomes)
    assert outcomes == {"lambada": [True, False]}


def test_task_calibration_and_held_out_scoring_use_disjoint_halves(tmp_path, monkeypatch):
    path = tmp_path / "requests.jsonl.gz"
    # even docs (the calibration half) have the model's favourite as a wrong answer, odd docs as the right one
    write_requests(path, [("Q:", ["abc", "xyz"], 0), ("Q:", ["xyz", "abc"], 0), ("R:", ["abc", "xyz"], 0),
                          ("R:", ["abc", "xyz"], 1), ("S:", ["xyz", "b"], 1), ("S:", ["b", "xyz"], 1)])
    monkeypatch.setattr(ev, "_requests_path", lambda task: path)
    calibration, evaluation = ev.split_task_docs(ev.load_task_requests("fake"))
    assert [d.doc_id for d in calibration] == [0, 2, 4] and [d.doc_id for d in evaluation] == [1, 3, 5]
    assert ev.task_calibration_texts("fake") == ["Q: abc", "R: abc", "S: b"]  # question + correct answer
    from torchao_eora.pipeline import calibration_texts

    assert calibration_texts("task:fake") == ["Q: abc", "R: abc", "S: b"]
    with pytest.raises(ValueError, match="task:NAME"):
        calibration_texts("task:")
    model, tok = gold_loving_model(), ByteTokenizer()
    assert ev.zero_shot(model, tok, tasks=("fake",), limit=None, progress=False, held_out=True)["fake"] == 1.0
    assert ev.zero_shot(model, tok, tasks=("fake",), limit=None, progress=False)["fake"] == 0.5
    assert ev.zero_shot(model, tok, tasks=("fake",), limit=2, progress=False, held_out=True)["fake"] == 1.0


def test_zero_eval_tokens_scores_tasks_only(tmp_path, monkeypatch):
    from torchao_eora.pipeline import evaluate

    path = tmp_path / "requests.jsonl.gz"
    write_requests(path, [("Q:", ["xyz", "abc"], 0), ("Q:", ["abc", "xyz"], 0)])
    monkeypatch.setattr(ev, "_requests_path", lambda task: path)
    metrics = evaluate(gold_loving_model(), ByteTokenizer(), eval_tokens=0, tasks=("fake",), progress=False)
    assert "ppl" not in metrics and metrics["fake"] == 0.5


def test_paired_difference_counts_only_the_docs_the_models_disagree_on():
    a = [True] * 40 + [False] * 50 + [True] * 6 + [False] * 4  # 46%
    b = [True] * 40 + [False] * 50 + [False] * 6 + [True] * 4  # 44%: same docs, 10 disagreements
    diff, stderr = ev.paired_difference(a, b)
    d = torch.tensor([float(x) - float(y) for x, y in zip(a, b)])
    assert diff == pytest.approx(0.02) and stderr == pytest.approx((d.std() / math.sqrt(100)).item())
    unpaired = math.hypot(ev.accuracy_stderr(0.46, 100), ev.accuracy_stderr(0.44, 100))
    assert stderr < unpaired / 2  # the 90 docs they agree on add no noise
    with pytest.raises(ValueError, match="same docs"):
        ev.paired_difference(a, b[:-1])


def test_accuracy_stderr_is_lm_evals():
    outcomes = torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 1, 1, 1])
    assert ev.accuracy_stderr(0.6, 10) == pytest.approx((outcomes.std() / math.sqrt(10)).item())
    assert ev.accuracy_stderr(1.0, 1) == 0.0


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_perplexity_and_piqa():
    model, tokenizer = data.load_model()
    assert tokenizer.pad_token_id is not None
    _, evaluation = data.wikipedia_split()
    tokens = data.token_stream(tokenizer, evaluation[:2])
    ppl = ev.perplexity(model, tokens, seq_len=512, batch_size=4, max_tokens=2048, progress=False)
    assert 10 < ppl < 60, ppl

    metrics = ev.zero_shot(model, tokenizer, tasks=("piqa",), limit=20, progress=False)
    assert set(metrics) == {"piqa", "piqa_stderr", "piqa_norm"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert data.bos_token_id(tokenizer) is None  # SmolLM2's tokenizer adds no BOS: windows stay plain text
