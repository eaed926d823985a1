"""The attention-mixed v_proj moment is exactly the metric of the attention output's change (plain X^T X is not)."""

import pytest
import torch

from helpers import tiny_llama
from torchao_eora.attention_moments import kv_head_of, mixed_value_moment, value_output_error
from torchao_eora.compressors import CompressedWeight, by_row_blocks


def _random_probs(b, h, t, gen, sink=0.0):
    """Causal softmax probabilities; ``sink`` adds logit mass on key 0 (an attention sink)."""
    logits = torch.randn(b, h, t, t, generator=gen, dtype=torch.float64) * 2
    logits[..., 0] += sink
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _attention_output(x, w_v, probs, num_kv_heads):
    """(B, T, H, head_dim): softmax(.) @ V, with V from v_proj weight w_v, kv heads repeated (GQA)."""
    b, t, _ = x.shape
    h = probs.shape[1]
    v = (x @ w_v.T).view(b, t, num_kv_heads, -1).transpose(1, 2)  # (B, H_kv, T, hd)
    v = v[:, kv_head_of(h, num_kv_heads)]  # (B, H, T, hd)
    return (probs @ v).transpose(1, 2)


def _plain_error(delta, x, mask):
    flat = x.reshape(-1, x.shape[-1])[mask.reshape(-1)]
    return float(torch.einsum("oi,ij,oj->", delta, flat.T @ flat, delta))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_mixed_moment_is_the_attention_output_metric(num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(0)
    b, t, d, hd = 3, 12, 10, 5
    x = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    x[..., 0] *= 0.1
    x[:, 0] = 0.1 * x[:, 0]
    x[:, 0, 0] = 5.0  # an atypical first token, along its own channel ...
    probs = _random_probs(b, num_heads, t, gen, sink=4.0)  # ... that receives most of the attention
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 9:] = False  # padded queries are not counted
    w = torch.randn(num_kv_heads * hd, d, generator=gen, dtype=torch.float64)
    delta = 0.01 * torch.randn(w.shape, generator=gen, dtype=torch.float64)

    change = _attention_output(x, w + delta, probs, num_kv_heads) - _attention_output(x, w, probs, num_kv_heads)
    direct = float(change[mask].pow(2).sum())

    per_head, count = mixed_value_moment(x, probs, mask, num_kv_heads=num_kv_heads)
    assert per_head.shape == (num_kv_heads, d, d) and per_head.dtype == torch.float64
    assert count == num_heads // num_kv_heads * int(mask.sum())
    assert value_output_error(delta, per_head) == pytest.approx(direct, rel=1e-5)

    # The mixed moment is the sum of x~ x~^T with x~ formed explicitly.
    mixed = torch.einsum("bhqt,bti->bhqi", probs, x)[mask[:, None].expand(-1, num_heads, -1)]
    summed, n = mixed_value_moment(x, probs, mask)
    assert n == num_heads * int(mask.sum())
    torch.testing.assert_close(summed, mixed.T @ mixed, rtol=1e-5, atol=1e-6)
    if num_kv_heads == 1:  # one kv head: the single summed matrix is exact too
        assert value_output_error(delta, summed) == pytest.approx(direct, rel=1e-5)

    # The plain moment X^T X is not this metric, not even up to a constant: the ratio (true change) / (plain
    # prediction) differs between an error along the sink token's direction and a random error.
    plain = _plain_error(delta, x, mask)
    assert abs(plain - direct) > 0.2 * direct
    sink_dir = torch.zeros_like(w)
    sink_dir[:, 0] = 0.1
    sink_change = _attention_output(x, w + sink_dir, probs, num_kv_heads) - _attention_output(x, w, probs, num_kv_heads)
    sink_direct = float(sink_change[mask].pow(2).sum())
    assert value_output_error(sink_dir, per_head) == pytest.approx(sink_direct, rel=1e-5)
    ratio_sink, ratio_random = sink_direct / _plain_error(sink_dir, x, mask), direct / plain
    assert abs(ratio_sink / ratio_random - 1) > 0.2, (ratio_sink, ratio_random)


def test_mixed_moment_checks_shapes():
    with pytest.raises(ValueError, match="attn_probs"):
        mixed_value_moment(torch.zeros(2, 4, 3), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="multiple"):
        mixed_value_moment(torch.zeros(2, 4, 3), torch.zeros(2, 3, 4, 4), num_kv_heads=2)


def test_per_head_compress_uses_each_heads_moment():
    w = torch.arange(12.0).view(4, 3)
    moments = torch.stack([torch.eye(3), 2 * torch.eye(3)])
    seen = []
    compress = lambda wb, c: (seen.append(float(c[0, 0])), CompressedWeight(wb + c[0, 0]))[1]  # noqa: E731
    out = by_row_blocks(compress, w, moments).dequantize()
    assert seen == [1.0, 2.0]
    torch.testing.assert_close(out, torch.cat([w[:2] + 1, w[2:] + 2]))


def test_mixed_moment_on_a_real_llama_with_eager_attention():
    """Real attention probabilities from a (random) Llama in eager mode; the o_proj input is the attention
    output, so perturbing v_proj by dW must change it by exactly sum_g tr(dW_g C_g dW_g^T)."""
    torch.manual_seed(0)
    model = tiny_llama(layers=1).double()
    model.config._attn_implementation = "eager"
    attn = model.model.layers[0].self_attn
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    seen = {}
    hooks = [
        attn.v_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
        attn.register_forward_hook(lambda m, a, out: seen.__setitem__("probs", out[1])),
        attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("outs", []).append(a[0])),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            x, probs = seen["x"], seen["probs"]
            assert probs is not None and probs.shape == (2, n_heads, 20, 20)
            delta = 0.05 * torch.randn_like(attn.v_proj.weight)
            attn.v_proj.weight += delta
            model(input_ids=ids, attention_mask=mask)
            attn.v_proj.weight -= delta
    finally:
        for h in hooks:
            h.remove()
    real = mask.bool()
    before, after = seen["outs"]
    direct = float((after - before)[real].pow(2).sum())
    per_head, _ = mixed_value_moment(x, probs, real, num_kv_heads=n_kv)
    assert value_output_error(delta, per_head) == pytest.approx(direct, rel=1e-6)
    plain = _plain_error(delta.double(), x.double(), real)
    assert abs(plain - direct) > 0.2 * direct  # X^T X gets this wrong
