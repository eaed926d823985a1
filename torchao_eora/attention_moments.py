"""The second moment that v_proj's compression error is actually seen through: attention-mixed inputs.

For query ``q`` and query head ``h`` the attention output (before ``o_proj``) is

    o_q^h = sum_t a^h_{q,t} W_v^{g(h)} x_t = W_v^{g(h)} x~^h_q,      x~^h_q = sum_t a^h_{q,t} x_t,

with ``a^h`` the softmax probabilities (rows = queries), ``W_v^g`` the rows of v_proj that belong to kv head
``g`` and ``g(h) = h // (H / H_kv)`` (grouped-query attention, transformers' ``repeat_kv``). An error ``dW`` in
v_proj therefore changes the attention output by

    sum_h sum_q || dW_{g(h)} x~^h_q ||^2 = sum_g tr(dW_g  C_g  dW_g^T),     C_g = sum_{h: g(h)=g} sum_q x~^h_q x~^h_q^T,

not by ``tr(dW X^T X dW^T)``. The plain moment counts every token once; the mixed one weights each token by the
attention mass it receives, which matters when a few tokens (the "attention sink", usually a window's first
token, with atypical inputs) receive most of the mass in later layers.

``C_g`` is exact for every row block of v_proj, and GPTQ / EoRA treat rows independently given a moment, so a
compressor can use one moment per kv head's row block (``compression.by_row_blocks``, which every compressor's
``compress`` applies to a (H_kv, in, in) stack); the sum
over kv heads, ``C = sum_g C_g``, is the single-matrix version that fits the ``compress(W, C)`` interface.

Cost: with ``M = sum_h A_h^T A_h`` (T x T, per sequence), ``C = X^T M X``; that is ``2 H T^3 + 4 T^2 in`` flops
per sequence, cheaper than forming every ``x~`` (``2 H T^2 in + 2 H T in^2``) when ``in >= T / 2`` or so, and
never materialises the (H, T, in) mixed inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["mixed_value_moment", "kv_head_of", "split_rows", "value_output_error"]


def kv_head_of(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``g(h)`` for every query head ``h``: transformers' ``repeat_kv`` gives query head h the kv head h // n_rep."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    return torch.arange(num_heads) // (num_heads // num_kv_heads)


@torch.no_grad()
def mixed_value_moment(
    x: torch.Tensor,
    attn_probs: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    *,
    num_kv_heads: Optional[int] = None,
) -> tuple[torch.Tensor, int]:
    """Sum over sequences, query heads and real query positions of ``x~ x~^T``, ``x~^h_q = sum_t a^h_{q,t} x_t``.

    Args:
        x: (B, T, in) the input of v_proj.
        attn_probs: (B, H, T, T) softmax probabilities, rows = queries, columns = keys (padded keys already carry
            zero probability, as the model's mask gives them).
        token_mask: optional (B, T) bool/int, True for real tokens; padded *query* rows are left out.
        num_kv_heads: None for one (in x in) matrix summed over all heads; an integer ``H_kv`` for one matrix per
            kv head, ``(H_kv, in, in)``, entry ``g`` summed over the query heads that read kv head ``g``.

    Returns:
        ``(sum_xx, count)``: fp64 sums (products in fp32, accumulated in fp64) and the number of (head, query)
        pairs summed into each matrix (so ``sum_xx / count`` is a mean).
    """
    if x.dim() != 3 or attn_probs.dim() != 4:
        raise ValueError(
            f"need x (B, T, in) and attn_probs (B, H, T, T), got {tuple(x.shape)} and {tuple(attn_probs.shape)}"
        )
    b, t, _ = x.shape
    _, h, tq, tk = attn_probs.shape
    if attn_probs.shape[0] != b or tq != t or tk != t:
        raise ValueError(f"attn_probs {tuple(attn_probs.shape)} does not match x {tuple(x.shape)}")
    groups = kv_head_of(h, num_kv_heads if num_kv_heads is not None else 1)
    n_groups = int(groups.max()) + 1
    a = attn_probs.detach().float()
    xf = x.detach().float()
    if token_mask is not None:
        m = token_mask.to(device=a.device, dtype=torch.bool)
        a = a * m[:, None, :, None]  # zero the padded query rows
        n_real = int(m.sum())
    else:
        n_real = b * t
    if not torch.isfinite(xf).all() or not torch.isfinite(a).all():
        raise ValueError("non-finite values in the v_proj inputs or the attention probabilities")
    d = x.shape[-1]
    total = torch.zeros(n_groups, d, d, dtype=torch.float64, device=x.device)
    for g in range(n_groups):
        heads = (groups == g).nonzero().flatten().tolist()
        for i in range(b):
            ag = a[i, heads]  # (h_g, Tq, Tk)
            mix = torch.einsum("hqs,hqt->st", ag, ag)  # sum_h A_h^T A_h  (Tk x Tk)
            xi = xf[i]
            total[g] += (xi.T @ (mix @ xi)).double()
    per_group = (h // n_groups) * n_real
    if num_kv_heads is None:
        return total[0], per_group
    return total, per_group


def split_rows(weight: torch.Tensor, num_kv_heads: int) -> list[torch.Tensor]:
    """v_proj's (H_kv * head_dim, in) weight as one row block per kv head."""
    if weight.shape[0] % num_kv_heads:
        raise ValueError(f"{weight.shape[0]} rows do not split into {num_kv_heads} kv heads")
    return list(weight.split(weight.shape[0] // num_kv_heads, dim=0))


def value_output_error(delta: torch.Tensor, moments: torch.Tensor) -> float:
    """``sum_g tr(dW_g C_g dW_g^T)``: the squared change of the attention output caused by v_proj error ``delta``
    (``moments`` (H_kv, in, in) from :func:`mixed_value_moment`; a single (in, in) moment is one block)."""
    if moments.dim() == 2:
        moments = moments[None]
    total = 0.0
    for d, c in zip(split_rows(delta.double(), moments.shape[0]), moments):
        total += float(torch.einsum("oi,ij,oj->", d, c.double(), d))
    return total
