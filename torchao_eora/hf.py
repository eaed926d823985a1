"""The Hugging Face save/load API: save a compressed model as safetensors + a config.json carrying
``TorchAoConfig(EoRAConfig)`` (atomically), and load it back strictly.

Plain ``AutoModelForCausalLM.from_pretrained(dir)`` reloads our checkpoints too, once ``import torchao_eora`` has
extended transformers' torchao quantizer (``hf_patches.py``); ``from_pretrained(fp_dir,
quantization_config=TorchAoConfig(EoRAConfig(...)))`` quantizes on load, data-free (plain SVD of the error).
Calibration statistics go through ``quantize_`` instead: load the unquantized model, then
``quantize_(model, eora_config(Calibration.load(path, model)))`` (torchao's handler sees modules, not their names).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint_checks import check_plain_checkpoint, checkpoint_headers
from .config import EoRAConfig
from .io_utils import atomic_directory, canonicalize_safetensors_header, recover_directory
from .tensor import QuantWithLowRank

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "attach_quantizer",
    "check_safetensors_only",
    "load_pretrained",
    "recorded_config",
    "save_pretrained",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# ---- saving -----------------------------------------------------------------------------------------------------


def recorded_config(model: torch.nn.Module) -> EoRAConfig:
    """The ``EoRAConfig`` recorded in ``model.config.quantization_config`` (a model loaded with ``from_pretrained``)."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    quant_type = getattr(quant, "quant_type", None)
    if not isinstance(quant_type, EoRAConfig):
        raise ValueError(
            "this model carries no EoRAConfig in model.config.quantization_config; pass the EoRAConfig it was "
            "compressed with (config=...)"
        )
    return quant_type


def attach_quantizer(model: torch.nn.Module, config: EoRAConfig) -> None:
    """Set ``model.config.quantization_config`` and ``model.hf_quantizer``: transformers saves a torchao checkpoint
    only for a model that has both."""
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    quant_config = TorchAoConfig(replace(config, calibration=None))  # statistics are not part of the checkpoint
    model.config.quantization_config = quant_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quant_config)


def write_checkpoint(model: torch.nn.Module, directory: Path, config: EoRAConfig, tokenizer=None) -> None:
    """Write safetensors + config.json (+ tokenizer) into an existing directory (no atomicity: see save_pretrained)."""
    attach_quantizer(model, config)
    untie_compressed_head(model)
    # In-memory names, as the torchao metadata records them: transformers would otherwise rename the flattened fields
    # back to the hub layout (Mixtral's block_sparse_moe, GPT-NeoX's embed_out) but not the metadata naming them.
    original_format = {"save_original_format": False} if _saves_original_format(model) else {}
    model.save_pretrained(directory, safe_serialization=True, **original_format)
    for weights in Path(directory).glob("*.safetensors"):
        canonicalize_safetensors_header(weights)  # same model, same bytes
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _saves_original_format(model: torch.nn.Module) -> bool:
    import inspect

    return "save_original_format" in inspect.signature(model.save_pretrained).parameters


def untie_compressed_head(model: torch.nn.Module) -> None:
    """A tied ``lm_head`` that ``quantize_`` compressed no longer shares the embedding's weight: record that in the
    config, or the saved model would be re-tied on load (and fail comparing a QuantWithLowRank with a tensor)."""
    config = getattr(model, "config", None)
    get_in, get_out = (getattr(model, f, None) for f in ("get_input_embeddings", "get_output_embeddings"))
    if not getattr(config, "tie_word_embeddings", False) or get_in is None or get_out is None:
        return
    head, embedding = get_out(), get_in()
    if head is None or embedding is None or head.weight is embedding.weight:
        return
    if isinstance(head.weight, QuantWithLowRank) or isinstance(embedding.weight, QuantWithLowRank):
        log.info("lm_head was compressed apart from the embeddings: saving it untied (tie_word_embeddings=False)")
        config.tie_word_embeddings = False
        text_config = getattr(config, "get_text_config", lambda: None)()
        if text_config is not None and text_config is not config:
            text_config.tie_word_embeddings = False
        if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
            model.all_tied_weights_keys = {}  # transformers would otherwise drop lm_head as a duplicate


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    config: EoRAConfig | None = None,
    tokenizer=None,
    *,
    overwrite: bool = False,
) -> Path:
    """``model.save_pretrained`` for a model compressed by ``quantize_(model, config)``, written atomically.

    Args:
        model: a Hugging Face model whose linear weights are ``QuantWithLowRank``.
        out_dir: the directory to write; an existing one is replaced only once the new one is complete (an atomic
            swap). A file, the directory the model was loaded from, or a non-empty directory that is not a
            torchao-eora checkpoint is refused.
        config: the ``EoRAConfig`` it was compressed with (default: the one in ``model.config``, for a model
            loaded with ``from_pretrained``). Its calibration statistics are not saved.
        tokenizer: saved alongside when given.
        overwrite: replace a non-empty directory that is not a torchao-eora checkpoint.

    Returns:
        The absolute path of the written directory; ``AutoModelForCausalLM.from_pretrained`` loads it after
        ``import torchao_eora``.
    """
    config = config if config is not None else recorded_config(model)
    sources = [getattr(model, "name_or_path", None) or None]  # never replace the directory being read
    with atomic_directory(out_dir, sources=sources, overwrite=overwrite) as tmp:
        write_checkpoint(model, tmp, config, tokenizer)
    return Path(out_dir).resolve()


# ---- loading ----------------------------------------------------------------------------------------------------


def check_safetensors_only(path: str | os.PathLike) -> Path:
    """A local model directory with safetensors weights; pickle-only checkpoints are refused (they can run code)."""
    path = Path(path)
    recover_directory(path)  # a save killed mid-swap (where renames are not atomic) is finished first
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local model directory")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickles)}); torchao-eora reads safetensors only "
                "(unpickling can execute code). Convert the checkpoint with save_pretrained(safe_serialization=True)."
            )
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    return path


def load_pretrained(path: str | os.PathLike, model_class=None, **kwargs) -> "PreTrainedModel":
    """``AutoModelForCausalLM.from_pretrained`` for a local checkpoint, strictly, in eval mode.

    Only safetensors are read, and a missing, unexpected or mis-shaped tensor is an error naming it
    (transformers on its own re-initialises missing tensors and ignores unexpected ones with a warning).

    Args:
        path: a local directory written by :func:`save_pretrained` (or any safetensors checkpoint).
        model_class: the class to load with (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``from_pretrained`` (e.g. ``dtype``, ``device_map``).
    """
    from transformers import AutoModelForCausalLM

    path = check_safetensors_only(path)
    headers = checkpoint_headers(path)  # a damaged index or shard is named here, as the streaming reader names it
    cls = model_class or AutoModelForCausalLM
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("load_pretrained never runs Python code from a model directory: drop trust_remote_code")
    kwargs = {"local_files_only": True, **kwargs, "use_safetensors": True, "trust_remote_code": False}
    # ignore_mismatched_sizes=True only so that transformers reports the names; a mismatch is still an error here.
    model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    problems = [
        f"{label}: {', '.join(sorted(_describe_key(k) for k in info.get(key) or ()))}"
        for key, label in (
            ("missing_keys", "missing tensors"),
            ("unexpected_keys", "unexpected tensors"),
            ("mismatched_keys", "mis-shaped tensors"),
        )
        if info.get(key)
    ]
    if problems:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(problems))
    if getattr(model.config, "quantization_config", None) is None:
        # A plain checkpoint: no quantizer ran check_checkpoint, and transformers casts an integer tensor into a
        # floating parameter without a word. (Quantized checkpoints are checked before loading.)
        check_plain_checkpoint(model, headers, names=False)  # names and shapes: transformers' info, above
    return model.eval()


def _describe_key(key) -> str:
    if isinstance(key, tuple):  # (name, checkpoint shape, model shape)
        return f"{key[0]} (checkpoint {tuple(key[1])}, model {tuple(key[2])})" if len(key) == 3 else str(key[0])
    return str(key)
