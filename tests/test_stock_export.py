"""Stock base export (``export_peft(base_format="torchao" | "dense")``): torchao's own ``IntxUnpackedToInt8Tensor``
with the same dequantized weights, and a plain dense fallback; loaded with transformers + PEFT in a process where
torchao_eora cannot be imported, the base + adapter reproduce our logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchao.quantization import IntxUnpackedToInt8Tensor, quantize_

from helpers import tiny_llama, token_batches
from torchao_eora import EoRAConfig, PruneConfig, QuantWithLowRank, RTNConfig, export_peft
from torchao_eora.stock_export import stock_base, stock_weight

# Runs in a fresh interpreter: torchao_eora is blocked before anything is imported, so only stock torchao,
# transformers and peft take part. Writes the logits of base alone and of base + adapter.
_LOAD = textwrap.dedent("""
    import sys
    sys.modules["torchao_eora"] = None  # any `import torchao_eora` now raises ImportError
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, inputs, out = sys.argv[1:5]
    batch = load_file(inputs)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    kinds = sorted({type(m.weight).__name__ for m in base.modules() if isinstance(m, torch.nn.Linear)})
    with torch.no_grad():
        plain = base(**batch).logits
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        logits = model(**batch).logits
    assert "torchao_eora" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
    save_file({"base": plain.contiguous(), "peft": logits.contiguous()}, out, metadata={"kinds": ",".join(kinds)})
""")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _load_without_torchao_eora(adapter_dir, batch, tmp_path):
    """(base logits, base + adapter logits, weight types of the linear layers) from a process without torchao_eora."""
    from safetensors import safe_open

    save_file(batch, str(tmp_path / "inputs.safetensors"))
    out = tmp_path / "logits.safetensors"
    subprocess.run(
        [sys.executable, "-c", _LOAD, str(adapter_dir / "base"), str(adapter_dir), str(tmp_path / "inputs.safetensors"),
         str(out)],
        check=True, cwd=tmp_path,
    )
    with safe_open(str(out), framework="pt") as f:
        kinds = f.metadata()["kinds"].split(",")
    logits = load_file(str(out))
    return logits["base"], logits["peft"], kinds


def _eora_model(base, rank=8):
    model = tiny_llama(layers=3)
    config = EoRAConfig(rank=rank, base=base, compensation="svd")
    quantize_(model, config)
    return model, config


@pytest.mark.parametrize("bits", [3, 4])
def test_torchao_weight_dequantizes_bit_identically(bits):
    model, _ = _eora_model(RTNConfig(bits=bits, group_size=32))
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.is_packed("qdata")  # our storage is bit-packed; the stock tensor holds one value per int8
    stock = stock_weight(w)
    assert isinstance(stock, IntxUnpackedToInt8Tensor) and stock.qdata.dtype == torch.int8
    assert stock.target_dtype == getattr(torch, f"int{bits}") and stock.block_size == (1, 32)
    assert torch.equal(stock.dequantize(), w.dequantize_base())
    assert torch.equal(stock_weight(w, "dense"), w.dequantize_base())
    x = torch.randn(5, w.shape[1])
    assert torch.equal(torch.nn.functional.linear(x, stock), x @ w.dequantize_base().t())


def test_stock_base_restores_the_model():
    model, config = _eora_model(RTNConfig(bits=3, group_size=32))
    quant = model.config.__dict__.get("quantization_config")
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with stock_base(model, "torchao", config):
        inner = {type(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        assert inner == {IntxUnpackedToInt8Tensor, torch.nn.Parameter}  # lm_head stays plain
        assert type(model.config.quantization_config.quant_type).__name__ == "IntxWeightOnlyConfig"
    assert [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] == weights
    assert model.config.__dict__.get("quantization_config") is quant


def test_unknown_base_format_is_one_line_error(tmp_path):
    model, config = _eora_model(RTNConfig(bits=3, group_size=32))
    with pytest.raises(ValueError, match=r"base_format must be one of \['torchao', 'dense', 'eora'\], got 'gguf'"):
        export_peft(model, tmp_path / "adapter", config=config, base_format="gguf")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 4])
def test_torchao_base_and_adapter_load_without_torchao_eora(bits, tmp_path):
    model, config = _eora_model(RTNConfig(bits=bits, group_size=32))
    out = export_peft(model, tmp_path / "adapter", config=config)  # base_format="torchao" is the default
    quant = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "torchao" and quant["modules_to_not_convert"] == ["lm_head"]
    intx = quant["quant_type"]["default"]
    assert intx["_type"] == "IntxWeightOnlyConfig" and intx["_data"]["weight_dtype"]["_data"] == f"int{bits}"
    assert intx["_data"]["granularity"]["_data"] == {"group_size": 32}
    assert all(isinstance(m.weight, QuantWithLowRank) and m.weight.rank == 8  # the exporting model is untouched
               for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)

    batch = token_batches(1, seed=21)[0]
    base, peft, kinds = _load_without_torchao_eora(out, batch, tmp_path)
    assert kinds == ["IntxUnpackedToInt8Tensor", "Parameter"]
    ours = _logits(model, batch)
    with stock_base(model, "dense"):
        ours_base = _logits(model, batch)
    torch.testing.assert_close(base, ours_base, rtol=0, atol=1e-6)  # same W_c
    assert (peft - ours).abs().max() < 1e-5
    assert (base - ours).abs().max() > 1e-3  # the adapter matters


@pytest.mark.slow
def test_pruned_base_falls_back_to_dense(tmp_path):
    model, config = _eora_model(PruneConfig("magnitude", "2:4"))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.target_dtype is None  # a dense, 2:4-pruned base: nothing for torchao's intx type to hold
    out = export_peft(model, tmp_path / "adapter", config=config)
    assert "quantization_config" not in json.loads((out / "base" / "config.json").read_text())
    stored = load_file(str(out / "base" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(stored, w.dequantize_base())
    assert (stored.reshape(-1, 4) == 0).sum(1).min() >= 2  # still 2:4

    batch = token_batches(1, seed=22)[0]
    _, peft, kinds = _load_without_torchao_eora(out, batch, tmp_path)
    assert kinds == ["Parameter"]
    assert (peft - _logits(model, batch)).abs().max() < 1e-5


@pytest.mark.slow
def test_dense_format_for_an_intx_base(tmp_path):
    model, config = _eora_model(RTNConfig(bits=3, group_size=32))
    out = export_peft(model, tmp_path / "adapter", config=config, base_format="dense")
    assert "quantization_config" not in json.loads((out / "base" / "config.json").read_text())
    batch = token_batches(1, seed=23)[0]
    _, peft, kinds = _load_without_torchao_eora(out, batch, tmp_path)
    assert kinds == ["Parameter"]
    assert (peft - _logits(model, batch)).abs().max() < 1e-5
