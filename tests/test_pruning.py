"""Pruning (magnitude, Wanda, SparseGPT) to N:M or a ratio, its compositions with RTN / GPTQ, and EoRA on top of
every compressor, per layer and end to end."""

import pytest
import torch
from torchao.quantization import quantize_
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

from helpers import anisotropic_moment, tiny_llama, token_batches
from torchao_eora import (
    EoRAConfig, GPTQConfig, PruneConfig, QuantWithLowRank, RTNConfig, calibrate, eora_config, eora_factors,
    svd_factors, weighted_error,
)


def zeros_per_group(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w.reshape(w.shape[0], -1, m) == 0).sum(-1)


W = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
C = anisotropic_moment()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_n_m_masks_are_exact(method, pattern):
    n, m = map(int, pattern.split(":"))
    cw = PruneConfig(method, pattern).compress(W, C)
    assert cw.bits is None and cw.qdata.dtype == torch.float32
    assert (zeros_per_group(cw.qdata, m) == m - n).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_unstructured_ratio_is_exact(method, ratio):
    pruned = PruneConfig(method, ratio=ratio).compress(W, C).dequantize()
    if method == "wanda":  # Wanda compares weights within each output row
        assert ((pruned == 0).sum(1) == round(W.shape[1] * ratio)).all()
    else:  # SparseGPT chooses per block, with counts allocated so the layer total is exact
        assert int((pruned == 0).sum()) == round(W.numel() * ratio)


@pytest.mark.parametrize("sparsity", [{"pattern": "2:4"}, {"ratio": 0.5}])
def test_activation_aware_pruning_has_lower_output_error_than_magnitude(sparsity):
    err = {m: weighted_error(W - PruneConfig(m, **sparsity).compress(W, C).dequantize(), None, C)
           for m in ("magnitude", "wanda", "sparsegpt")}
    assert err["wanda"] / err["magnitude"] < 0.8, err
    assert err["sparsegpt"] / err["magnitude"] < 0.8, err
    assert err["sparsegpt"] < err["wanda"], err  # SparseGPT also updates the surviving weights


QUANTIZERS = [RTNConfig(4, 64), RTNConfig(3, 64, symmetric=True), GPTQConfig(4, 64), GPTQConfig(3, 64, symmetric=True),
              GPTQConfig(4, 64, act_order=True)]


# SparseGPT + act-order is rejected by design (test_bad_inputs_are_rejected_clearly), so it is not a case here.
@pytest.mark.parametrize(
    "quantizer, method",
    [(q, m) for q in QUANTIZERS for m in ("magnitude", "wanda", "sparsegpt")
     if not (m == "sparsegpt" and getattr(q, "act_order", False))],
    ids=lambda v: v.describe().replace(" ", "-") if hasattr(v, "describe") else v,
)
def test_quantized_pruned_weights_stay_exactly_zero(quantizer, method):
    config = PruneConfig(method, "2:4", quantizer=quantizer)
    cw = config.compress(W, C)
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[getattr(torch, f"int{quantizer.bits}")]
    assert cw.bits == quantizer.bits and cw.qdata.dtype == torch.int8
    assert qmin <= cw.qdata.min() and cw.qdata.max() <= qmax
    dense = cw.dequantize()
    assert (zeros_per_group(dense, 4) >= 2).all()  # rounding may add zeros, never resurrect pruned ones
    if method != "sparsegpt":  # the fixed mask is known up front: exactly those weights are zero
        assert (dense[config.mask(W, C)] == 0).all()
    prune_only = PruneConfig(method, "2:4").compress(W, C).dequantize()
    if not isinstance(quantizer, GPTQConfig) or method != "sparsegpt":
        assert (dense[prune_only == 0] == 0).all()


def test_joint_sparsegpt_gptq_beats_pruning_then_rounding():
    """One sweep that prunes and rounds lets the kept weights absorb the rounding error too."""
    joint = PruneConfig("sparsegpt", "2:4", quantizer=GPTQConfig(4, 64)).compress(W, C).dequantize()
    rtn = PruneConfig("sparsegpt", "2:4", quantizer=RTNConfig(4, 64)).compress(W, C).dequantize()
    assert weighted_error(W - joint, None, C) < weighted_error(W - rtn, None, C)


COMPRESSORS = [
    GPTQConfig(3, 32),
    PruneConfig("sparsegpt", "2:4"),
    PruneConfig("wanda", "2:4"),
    PruneConfig("magnitude", "2:4"),
    PruneConfig("sparsegpt", "2:4", quantizer=GPTQConfig(4, 32)),
]
IDS = [c.describe().replace(" ", "-") for c in COMPRESSORS]


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=IDS)
def test_eora_beats_plain_svd_over_every_compressor(compressor):
    delta = W - compressor.compress(W, C).dequantize()
    eora = weighted_error(delta, eora_factors(delta, C, 16), C)
    svd = weighted_error(delta, svd_factors(delta, 16), C)
    assert eora < 0.95 * svd < 0.95 * weighted_error(delta, None, C)


def _logit_error(model, reference, batches):
    with torch.no_grad():
        return sum(float((model(**b).logits - reference(**b).logits).pow(2).mean()) for b in batches)


@pytest.mark.slow  # calibrates, compresses and evaluates a whole model per compressor
@pytest.mark.parametrize("compressor", COMPRESSORS, ids=IDS)
def test_end_to_end_one_calibration_pass_feeds_compression_and_compensation(compressor):
    reference = tiny_llama()
    calib_batches, held_out = token_batches(4, seed=0), token_batches(2, seed=1)
    errors = {}
    for method in ("none", "svd", "eora"):
        model = tiny_llama()
        calib = calibrate(model, calib_batches, EoRAConfig(rank=8, base=compressor, compensation=method), progress=False)
        quantize_(model, eora_config(calib))
        weight = model.model.layers[1].mlp.down_proj.weight
        assert isinstance(weight, QuantWithLowRank) and weight.rank == (0 if method == "none" else 8)
        errors[method] = _logit_error(model, reference, held_out)
    assert errors["eora"] < errors["svd"] < errors["none"], errors


def test_bad_inputs_are_rejected_clearly():
    for bad in ("2-4", "4:2", "0:4", "a:b", "2:4:8", "4:4"):
        with pytest.raises(ValueError, match="pattern"):
            PruneConfig("magnitude", bad)
    for ratio in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio must be in \\(0, 1\\)"):
            PruneConfig("magnitude", ratio=ratio)
    with pytest.raises(ValueError, match="not both"):
        PruneConfig("magnitude", "2:4", ratio=0.5)
    with pytest.raises(ValueError, match="pruning criterion"):
        PruneConfig("random")
    with pytest.raises(ValueError, match="natural column order"):
        PruneConfig("sparsegpt", quantizer=GPTQConfig(act_order=True))
    with pytest.raises(TypeError, match="quantizer"):
        PruneConfig("magnitude", quantizer=PruneConfig())
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match="needs calibration statistics"):
            PruneConfig(method).compress(W)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        PruneConfig("magnitude", quantizer=GPTQConfig()).compress(W)
    with pytest.raises(ValueError, match="not a multiple of M=8"):
        PruneConfig("magnitude", "2:8").compress(torch.randn(4, 12))
    with pytest.raises(ValueError, match="does not divide"):
        PruneConfig("magnitude", quantizer=RTNConfig(4, 48)).compress(W)
    assert PruneConfig("magnitude").compress(torch.randn(4, 16)).bits is None  # data-free: no statistics needed


def test_cli_flags_build_the_paper_compressions():
    from torchao_eora.cli import _config_from_args, build_parser

    def config(*flags):
        return _config_from_args(build_parser().parse_args(["quantize", *flags]))

    assert config().base == RTNConfig(3, 64) and config().compensation == "eora"
    assert config("--quantizer", "gptq", "--bits", "3", "--act-order", "--compensation", "svd").base == GPTQConfig(
        3, 64, act_order=True)
    assert config("--quantizer", "gptq", "--bits", "4", "--sparsity", "2:4", "--prune", "sparsegpt").base == PruneConfig(
        "sparsegpt", "2:4", quantizer=GPTQConfig(4, 64))
    assert config("--quantizer", "none", "--sparsity", "2:4", "--prune", "wanda").base == PruneConfig("wanda", "2:4")
    assert config("--quantizer", "none", "--sparsity", "0.5").base == PruneConfig("sparsegpt", ratio=0.5)
    for bad in (["--quantizer", "none"], ["--prune", "wanda"], ["--act-order"]):
        with pytest.raises(ValueError, match="--"):  # the CLI prints it as one line, exit status 2
            config(*bad)
    for bad in ("4:2", "1.5", "half"):
        with pytest.raises(SystemExit):  # argparse usage error
            config("--sparsity", bad)
