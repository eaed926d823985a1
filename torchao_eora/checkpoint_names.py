"""On-disk tensor names mapped to the in-memory model's, the way ``from_pretrained`` maps them.

A checkpoint on the hub layout is not the model's state dict: Qwen3-MoE and DeepSeek-V3 store each expert apart
(``mlp.experts.0.gate_proj.weight``, ...) and transformers fuses them into ``mlp.experts.gate_up_proj`` at load;
Mixtral renames ``block_sparse_moe`` to ``mlp``; GPT-NeoX's head is ``embed_out``. :class:`CheckpointLayout` applies
transformers' own conversion mapping (``conversion_mapping.get_model_conversion_mapping``: the renamings and the
weight converters with their merge / concatenate operations), one in-memory tensor at a time, so the streaming reader
materialises one decoder layer as ``from_pretrained`` would.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from functools import partial
from typing import Protocol

import torch

__all__ = ["CheckpointLayout"]


class _Tensors(Protocol):
    def keys(self) -> list[str]: ...

    def get(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor: ...


class CheckpointLayout:
    """The tensors of a checkpoint (``streaming.ShardedWeights``) under the in-memory names of ``model``."""

    def __init__(self, model: torch.nn.Module, tensors: _Tensors):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter, WeightRenaming, dot_natural_key, rename_source_key,
        )

        self.model, self.tensors = model, tensors
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        meta_state = model.state_dict()
        self.sources: dict[str, list[tuple[str, str | None]]] = defaultdict(list)  # name -> (disk key, pattern)
        self._converter: dict[str, object] = {}
        for key in sorted(tensors.keys(), key=dot_natural_key):  # experts in index order, as transformers merges them
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            self.sources[name].append((key, pattern))
            if pattern is not None:
                self._converter[name] = next(c for c in converters if pattern in c.source_patterns)

    def headers(self, disk: dict) -> dict:
        """The checkpoint's headers (``checkpoint_checks.checkpoint_headers``) under in-memory names, for
        ``check_plain_checkpoint``. A tensor converted from several (fused experts) takes the model's shape (the
        converter itself refuses parts that do not fit) and the first non-floating dtype of its parts, if any."""
        from .checkpoint_checks import is_floating

        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        out = {}
        for name, sources in self.sources.items():
            parts = [disk[key] for key, _ in sources]
            if name not in self._converter:
                out[name] = parts[0]
                continue
            odd = next((h for h in parts if not is_floating(h.dtype)), parts[0])
            out[name] = odd._replace(shape=shapes.get(name, odd.shape))
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def keys(self) -> list[str]:
        return sorted(self.sources)

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """The in-memory tensor ``name``: one checkpoint tensor renamed, or several converted into one."""
        sources = self.sources.get(name)
        if not sources:
            raise ValueError(f"the checkpoint has no tensors for {name!r} (a checkpoint of another model?)")
        template = self._converter.get(name)
        if template is None:
            return self.tensors.get(sources[0][0], dtype, device)
        converter = copy.deepcopy(template)  # collects tensors: one instance per converted name, as transformers does
        for key, pattern in sources:
            converter.add_tensor(name, key, pattern, partial(self.tensors.get, key, dtype, device))
        value = converter.convert(name, model=self.model, config=self.model.config)[name]
        return value[0] if isinstance(value, list) else value
