"""Output-side weighting: where in a layer's output an error costs loss.

EoRA weights the residual's error by the layer's inputs, ``||(dW - B A) X^T||_F``, and treats every output channel
alike. The loss does not: to second order (K-FAC's Kronecker form of the Fisher), an error ``E`` in a weight costs
``tr(D E C E^T)``, ``C = X^T X`` the input moment and ``D = E[g g^T]`` the second moment of the loss gradient ``g``
at the layer's output. With ``D``'s diagonal ``d`` the optimum stays closed form: EoRA's solve for the rows of
``dW`` scaled by ``sqrt(d)``, then ``B`` scaled back (``transform.eora_quantize_tensor``).

``d`` comes from one forward and backward pass of the original model over the calibration windows (the language
model's own next-token loss), before the sequential pass: about three forwards of compute and the activations of one
window through the whole model. A streamed checkpoint gets the same numbers one decoder layer at a time
(``layerwise_gradients.py``). Each ``d`` is divided by its mean
(only its shape matters to a module's solve) and pulled toward 1 by ``FLOOR``, so an output channel whose
gradient vanished on the calibration windows still gets its error fitted.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

__all__ = ["FLOOR", "output_gradient_moments", "output_weighting"]

# Share of a uniform weight mixed into each normalised diagonal: (1 - FLOOR) d / mean(d) + FLOOR.
FLOOR = 0.1


def output_gradient_moments(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], linears: Mapping[str, torch.nn.Linear],
) -> dict[str, torch.Tensor]:
    """Per linear (by name), the diagonal ``d`` of the loss gradient's second moment at its output (per predicted
    token), (out_features,) fp32, from the gradient of each predicted token's own loss (the summed next-token loss) on
    ``batches`` (padded positions excluded).
    Runs where the model is; no weight gets a gradient (only the activations carry one)."""
    sums = {name: None for name in linears}
    handles = []

    def watch(name):
        def hook(module, args, output):
            def accumulate(grad):
                square = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0)
                sums[name] = square if sums[name] is None else sums[name] + square

            output.register_hook(accumulate)
        return hook

    handles = [m.register_forward_hook(watch(name)) for name, m in linears.items()]
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_()))
    device = embeddings.weight.device
    tokens = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # no weight gradients: they would cost a copy of the model
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
                for row in range(len(mask)):  # one window at a time: the backward keeps every activation
                    ids, row_mask = batch["input_ids"][row:row + 1].to(device), mask[row:row + 1].to(device)
                    labels = ids.masked_fill(row_mask == 0, -100)
                    predicted = int((labels[:, 1:] != -100).sum())  # the loss is their mean: make it the sum
                    tokens += predicted
                    if predicted:
                        (model(input_ids=ids, attention_mask=row_mask, labels=labels).loss * predicted).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    missing = [name for name, s in sums.items() if s is None]
    if missing:
        raise RuntimeError(f"no loss gradient reached {missing[0]} (and {len(missing) - 1} more): output weighting "
                           "needs every compressed linear on the path from the embeddings to the loss")
    return {name: s / max(tokens, 1) for name, s in sums.items()}


def output_weighting(d: torch.Tensor) -> torch.Tensor:
    """The weights a module's residual is fitted with: ``d`` divided by its mean (only its shape matters to one
    module's solve), pulled toward 1 by ``FLOOR``."""
    return (1 - FLOOR) * d / d.mean().clamp_min(torch.finfo(torch.float32).tiny) + FLOOR
