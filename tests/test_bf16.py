"""bf16 end to end: `--dtype bfloat16` quantizes, saves, reloads and evaluates a model whose every floating tensor
(compute dtype, adapters, scales) is bf16, and it computes what the fp32 path computes, up to bf16 rounding."""

import pytest
import torch
from safetensors import safe_open

from helpers import token_batches
from torchao_eora import QuantWithLowRank, cli, pipeline
from torchao_eora.hf import load_pretrained


def _quantize(tiny_dir, out, dtype, adapter_bits):
    argv = ["quantize", "--model", str(tiny_dir), "--dtype", dtype, "--rank", "8", "--adapter-bits", adapter_bits,
            "--group-size", "32", "--calib-samples", "4", "--seq-len", "32", "--eval-tokens", "0", "--tasks", "",
            "--out", str(out)]
    assert cli.main(argv) == 0
    return load_pretrained(out)


@pytest.mark.parametrize("adapter_bits", ["none", "4"])
def test_bfloat16_end_to_end(tiny_dir, tmp_path, monkeypatch, adapter_bits):
    bf16 = _quantize(tiny_dir, tmp_path / "bf16", "bfloat16", adapter_bits)
    fp32 = _quantize(tiny_dir, tmp_path / "fp32", "float32", adapter_bits)
    weights = [m.weight for m in bf16.modules() if isinstance(getattr(m, "weight", None), QuantWithLowRank)]
    assert len(weights) == 14
    for w in weights:
        assert w.dtype == torch.bfloat16 and w.scale.dtype == torch.bfloat16
        if adapter_bits == "none":
            assert w.A.dtype == w.B.dtype == torch.bfloat16
        else:
            assert w.A_scale.dtype == w.B_scale.dtype == torch.bfloat16
    floating = set()
    for shard in (tmp_path / "bf16").glob("*.safetensors"):  # the streaming writer shards per layer
        with safe_open(str(shard), framework="pt") as f:
            floating |= {f.get_slice(k).get_dtype() for k in f.keys()} - {"I8", "U8", "I32", "I64"}
    assert floating == {"BF16"}  # nothing is written in fp32

    batch = token_batches(1, seed=3)[0]
    with torch.no_grad():
        low = bf16(**batch).logits
        high = fp32(**batch).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    # the same calibration text and solver (fp32/fp64 inside), so the models differ by bf16 rounding only
    assert (low.float() - high).abs().mean() < 0.05 * high.abs().mean()

    monkeypatch.setattr(pipeline, "wikipedia_split", lambda: ([], ["the quick brown fox " * 20]))
    assert cli.main(["eval", "--model", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--eval-tokens", "200",
                     "--seq-len", "32", "--tasks", ""]) == 0
