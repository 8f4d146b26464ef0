"""``sg.nn.utils``: torch.nn.utils' gradient clipping, for eager training loops. Imports
graph.optim (where the one clipping rule lives) and graph.tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

from shardgrad.graph.optim import clip_grad_norm
from shardgrad.graph.tensor import Tensor, no_grad, tensor


def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float) -> Tensor:
    """Scale the ``.grad`` of ``parameters`` in place so that their global L2 norm is at most
    ``max_norm``; returns the norm before clipping, as torch.nn.utils.clip_grad_norm_. (For a
    compiled step set ``optimizer.max_grad_norm``: the same rule, inside the step.)"""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    with no_grad():
        grads = {id(p): p.grad for p in params if p.grad is not None}
        if not grads:
            return tensor(0.0)
        total = sum(float((g * g).sum().item()) for g in grads.values()) ** 0.5
        for p, g in zip([p for p in params if p.grad is not None],
                        clip_grad_norm(grads, max_norm).values(), strict=True):
            p.grad = g
    return tensor(total, dtype=next(iter(grads.values())).dtype)


__all__ = ["clip_grad_norm_"]
