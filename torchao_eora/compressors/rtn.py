"""Round-to-nearest weight quantization (int2..int8, grouped, symmetric or asymmetric) via torchao primitives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.quantization.quant_primitives import MappingType
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

from ..checks import check_bool, check_int
from .base import CompressedWeight, check_group_size

__all__ = ["RTNConfig"]


@dataclass
class RTNConfig:
    """Group-wise round-to-nearest: the same math and layout as torchao's ``IntxWeightOnlyConfig``.

    Args:
        bits: 2..8.
        group_size: number of input channels sharing one scale (must divide in_features).
        symmetric: symmetric (zero point 0) or asymmetric (min/max) mapping.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False

    needs_calibration = False  # class attribute, not a config field

    def __post_init__(self) -> None:
        check_int("bits", self.bits, 2, 8)
        check_int("group_size", self.group_size, 1)
        check_bool("symmetric", self.symmetric)

    def describe(self) -> str:
        return f"int{self.bits} g{self.group_size} {'sym' if self.symmetric else 'asym'} RTN"

    def compress(self, weight: torch.Tensor, second_moment: torch.Tensor | None = None) -> CompressedWeight:
        check_group_size(self.group_size, weight.shape[1])
        mapping = MappingType.SYMMETRIC if self.symmetric else MappingType.ASYMMETRIC
        q = IntxUnpackedToInt8Tensor.from_hp(
            weight.detach().float(), (1, self.group_size), getattr(torch, f"int{self.bits}"), mapping_type=mapping
        )
        return CompressedWeight(q.qdata, q.scale, q.zero_point, self.bits, self.group_size)
