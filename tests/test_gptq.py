"""GPTQ: lower layer-output error than RTN on correlated activations, RTN bit for bit when there is nothing to
propagate, and torchao's intx layout."""

import contextlib

import pytest
import torch
from torchao.core.config import config_from_dict, config_to_dict
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

from helpers import anisotropic_moment
from torchao_eora import EoRAConfig, GPTQConfig, PruneConfig, QuantWithLowRank, RTNConfig, svd_factors, weighted_error
from torchao_eora.compressors.sweep import GroupQuantizer, _act_order, _upper_cholesky_of_inverse, obs_sweep

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def output_error(weight: torch.Tensor, compressed: torch.Tensor, moment: torch.Tensor) -> float:
    """``||(W - W_c) X^T||_F`` from the second moment alone."""
    return weighted_error(weight - compressed, None, moment)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_has_lower_output_error_than_rtn(bits, symmetric, act_order):
    torch.manual_seed(0)
    w, c = torch.randn(128, 256), anisotropic_moment()
    rtn = RTNConfig(bits, 64, symmetric).compress(w).dequantize()
    gptq = GPTQConfig(bits, 64, symmetric, act_order=act_order).compress(w, c).dequantize()
    ratio = output_error(w, gptq, c) / output_error(w, rtn, c)
    assert ratio < 0.95, f"GPTQ/RTN output error {ratio:.3f}"


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_identity_moment_gives_rtn_bit_for_bit(act_order, symmetric):
    """With H = I nothing propagates, so GPTQ must reproduce torchao's RTN exactly: same qparams, same ints."""
    w = torch.randn(32, 128)
    gptq = GPTQConfig(3, 32, symmetric, act_order=act_order).compress(w, torch.eye(128, dtype=torch.float64))
    rtn = RTNConfig(3, 32, symmetric).compress(w)
    for field in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(gptq, field), getattr(rtn, field)), field


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act_order", [False, True])
def test_layout_dequantizes_and_round_trips_through_quant_with_low_rank(device, act_order):
    torch.manual_seed(0)
    w, c = torch.randn(64, 256, device=device), anisotropic_moment().to(device)
    config = GPTQConfig(3, 64, act_order=act_order, block_size=96)  # a block that is not a multiple of the group
    cw = config.compress(w, c)
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[torch.int3]
    assert cw.qdata.dtype == torch.int8 and cw.qdata.shape == w.shape and cw.qdata.device.type == device
    assert qmin <= cw.qdata.min() and cw.qdata.max() <= qmax
    assert cw.scale.shape == cw.zero_point.shape == (64, 4) and cw.zero_point.dtype == torch.int8
    # the sweep's own dequantized columns are what torchao's dequantize_affine gives for the stored layout
    sweep = obs_sweep(w, c, quantizer=GroupQuantizer(3, 64), act_order=act_order, block_size=96)
    assert torch.equal(sweep.weight, cw.dequantize())
    factors = svd_factors(w - cw.dequantize(), 8)
    t = QuantWithLowRank.from_parts(cw, factors)
    assert t.bits == 3 and t.group_size == 64
    assert torch.equal(t.dequantize_base(), cw.dequantize())
    x = torch.randn(5, 256, device=device)
    expected = x @ (cw.dequantize() + factors.B @ factors.A).T
    torch.testing.assert_close(torch.nn.functional.linear(x, t), expected, rtol=1e-4, atol=1e-4)


def test_dead_input_channels_get_zero_weights_and_no_nans():
    torch.manual_seed(0)
    w, c = torch.randn(32, 128), anisotropic_moment(128)
    dead = torch.tensor([3, 40, 41, 127])
    c[dead, :] = 0
    c[:, dead] = 0
    out = GPTQConfig(4, 32, act_order=True).compress(w, c).dequantize()
    assert torch.isfinite(out).all()
    assert (out[:, dead] == 0).all()


def test_bad_inputs_are_rejected_clearly():
    w = torch.randn(16, 128)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        GPTQConfig().compress(w)
    with pytest.raises(ValueError, match="expected \\(128, 128\\)"):
        GPTQConfig(group_size=32).compress(w, torch.eye(64))
    with pytest.raises(ValueError, match="does not divide in_features=128"):
        GPTQConfig(group_size=48).compress(w, torch.eye(128))
    with pytest.raises(ValueError, match="non-finite"):
        GPTQConfig(group_size=32).compress(w, torch.full((128, 128), float("nan")))
    with pytest.raises(ValueError, match="bits"):
        GPTQConfig(bits=9)
    with pytest.raises(ValueError, match="percdamp"):
        GPTQConfig(percdamp=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=0)


def test_configs_serialize_by_name_and_report_what_they_need():
    config = EoRAConfig(rank=16, base=PruneConfig("sparsegpt", "2:4", quantizer=GPTQConfig(4, 64, act_order=False)))
    again = config_from_dict(config_to_dict(config))
    assert again == config and isinstance(again.base.quantizer, GPTQConfig)
    assert GPTQConfig.needs_calibration and not RTNConfig.needs_calibration
    assert PruneConfig("magnitude").needs_calibration is False
    assert PruneConfig("magnitude", quantizer=GPTQConfig()).needs_calibration is True
    assert PruneConfig("wanda").needs_calibration is True
    assert config.describe() == "SparseGPT 2:4 + int4 g64 asym GPTQ + eora r16"


# ---- determinism: the same result whatever the thread count -----------------------------------------------------


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _unit_diagonal(moment: torch.Tensor) -> torch.Tensor:
    """The correlation matrix of ``moment``: positive definite, every diagonal entry exactly 1 (all tied)."""
    d = moment.diagonal().sqrt()
    c = moment / d[:, None] / d[None, :]
    c.diagonal().fill_(1.0)
    return c


def test_act_order_visits_tied_columns_in_index_order():
    h = torch.diag(torch.tensor([1.0, 3.0, 1.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    assert _act_order(h).tolist() == [1, 3, 4, 0, 2, 5]
    assert torch.equal(_act_order(_unit_diagonal(anisotropic_moment(512))), torch.arange(512))


def test_inverse_hessian_factor_is_thread_independent():
    """MKL's Cholesky / inverse give different last bits with 1 and 2 threads unless pinned to one."""
    h = anisotropic_moment(256)
    with _threads(1):
        one = _upper_cholesky_of_inverse(h, 0.01)
    with _threads(2):
        two = _upper_cholesky_of_inverse(h, 0.01)
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "case", ["tied", "realistic", "ill-conditioned"],
)
def test_act_order_gptq_is_bit_identical_under_1_and_2_threads(case):
    """Tied diagonal (every column ties for act-order), an LLM-like moment, and an ill-conditioned one (fewer
    tokens than inputs, light damping, 8 bits: the inverse's last bits reach the rounding): same ints either way."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(256, 256, generator=g)
    config = GPTQConfig(4, 32, act_order=True)
    if case == "tied":
        h = _unit_diagonal(anisotropic_moment(256))
    elif case == "realistic":
        h = anisotropic_moment(256)
    else:
        h, config = anisotropic_moment(256, tokens=128, seed=9), GPTQConfig(8, 32, act_order=True, percdamp=1e-6)
    with _threads(1):
        one = config.compress(w, h)
    with _threads(2):
        two = config.compress(w, h)
    for field in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(one, field), getattr(two, field)), field
