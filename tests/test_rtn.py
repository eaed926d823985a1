import pytest
import torch
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup
from torchao.quantization.quant_primitives import MappingType

from torchao_eora import RTNConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_is_torchao_intx_weight_only(bits, symmetric):
    w = torch.randn(16, 128)
    ours = RTNConfig(bits=bits, group_size=32, symmetric=symmetric).compress(w)
    lin = torch.nn.Linear(128, 16, bias=False)
    lin.weight.data = w.clone()
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    quantize_(lin, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(32), mapping_type=mapping))
    assert torch.equal(ours.qdata, lin.weight.qdata)
    assert torch.equal(ours.dequantize(), lin.weight.dequantize())
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert ours.qdata.min() >= lo and ours.qdata.max() <= hi


def test_more_bits_less_error():
    w = torch.randn(32, 128)
    errs = [(w - RTNConfig(bits=b, group_size=32).compress(w).dequantize()).norm() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_bad_group_size_and_bits():
    with pytest.raises(ValueError, match="does not divide in_features=576"):
        RTNConfig(bits=3, group_size=128).compress(torch.randn(4, 576))
    with pytest.raises(ValueError, match="bits"):
        RTNConfig(bits=1)
