"""Budgeted ranks: spend the adapter parameters of a uniform rank ``r`` where they remove the most error.

``EoRAConfig(rank=r, rank_budget="global")`` gives the model the same total adapter parameters as rank ``r``
everywhere, ``sum_m r_m (in_m + out_m)``, allocated greedily: each step adds ``step`` ranks to the module whose next
ranks remove the most activation-weighted squared error per adapter parameter. What a module's ``k+1``-th rank
removes is exactly the ``k``-th entry of its error spectrum (``solver.error_spectrum``: the squared singular values
the solver truncates), so the allocation is exact for the statistics it is given. A module's error spectrum is
non-increasing, so the greedy choice is the optimum of the fractional knapsack over all modules.
"""

from __future__ import annotations

import heapq
from typing import Mapping

import torch

__all__ = ["allocate_ranks"]


def allocate_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budget: int,
    max_ranks: Mapping[str, int],
    step: int = 1,
) -> dict[str, int]:
    """Per-module ranks (multiples of ``step``, at most ``max_ranks[name]``) using at most ``budget`` adapter
    parameters, a rank of module ``m`` costing ``in_m + out_m``.

    Args:
        spectra: per module, what each successive rank removes (``solver.error_spectrum``), descending.
        shapes: per module, ``(out_features, in_features)``.
        budget: adapter parameters to spend (``sum_m r (in_m + out_m)`` for the uniform rank ``r``).
        max_ranks: per module, the largest rank allowed.
        step: ranks are given ``step`` at a time (the adapter group size with quantized adapters).
    """
    ranks = {name: 0 for name in spectra}

    def offer(name: str):
        rank, cost = ranks[name], step * sum(shapes[name])
        if rank + step > max_ranks[name]:
            return None
        gain = float(spectra[name][rank:rank + step].sum())
        return (-gain / cost, name, cost)

    heap = [o for o in map(offer, sorted(spectra)) if o is not None]
    heapq.heapify(heap)
    left = budget
    while heap:
        _, name, cost = heapq.heappop(heap)
        if cost > left:
            continue  # this module's next ranks no longer fit; a smaller module's might
        ranks[name] += step
        left -= cost
        following = offer(name)
        if following is not None:
            heapq.heappush(heap, following)
    return ranks
