"""Optimizers (``sg.optim``): SGD (momentum, nesterov, weight decay), Adam, AdamW.

Each update rule is written once on Tensors, so it runs eagerly in ``step()`` and traces into
the training-step Graph (where lr and the step count are graph inputs). State is a dict of
tensors per parameter, as in PyTorch. Imports graph.tensor and graph.device.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from shardgrad.graph.device import to_device
from shardgrad.graph.tensor import Tensor, no_grad, zeros


class Optimizer:
    """Holds the parameters, hyper-parameters and per-parameter state.

    ``rule(p, g, state, lr, t) -> (new_p, new_state)`` is the update for one parameter;
    ``p``, ``g`` and the state are Tensors (eager or traced), ``lr`` and ``t`` (the 1-based
    step count) numbers or scalar Tensors.
    """

    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor], lr: float, **defaults):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        self.lr = float(lr)
        self.defaults = defaults
        self.t = 0
        self.state: list[dict[str, Tensor]] = [
            {k: zeros(p.shape, dtype=p.dtype, device=p.device) for k in self.state_keys}
            for p in self.params]

    def rule(self, p, g, state, lr, t):
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One eager update of every parameter that has a gradient."""
        self.t += 1
        with no_grad():
            for p, st in zip(self.params, self.state, strict=True):
                if p.grad is None:
                    continue
                for v in st.values():      # the model may have moved since (Module.to)
                    if v.device != p.device:
                        v._set_leaf(to_device(v.data, p.device))
                new_p, new_state = self.rule(p.detach(), p.grad, st, self.lr, self.t)
                p.data = new_p.data
                for k, v in new_state.items():
                    st[k].assign_(v)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays by ``<param index>.<key>``, plus ``step`` (safetensors-ready)."""
        out = {f"{i}.{k}": v.numpy().copy() for i, st in enumerate(self.state)
               for k, v in st.items()}
        out["step"] = np.asarray(self.t, dtype=np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        want = set(self.state_dict())
        if set(state) != want:
            raise KeyError(f"optimizer state keys differ: missing {sorted(want - set(state))}, "
                           f"unexpected {sorted(set(state) - want)}")
        for i, st in enumerate(self.state):
            for k in st:
                st[k].data = state[f"{i}.{k}"]
        self.t = int(state["step"])


class SGD(Optimizer):
    """p <- p - lr * d, with d = g + wd p, and with momentum mu: b <- mu b + d;
    d = b (or d + mu b with Nesterov), as torch.optim.SGD (dampening 0)."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        self.state_keys = ("momentum_buffer",) if momentum else ()
        super().__init__(params, lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov)
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def rule(self, p, g, state, lr, t):
        d = g + self.weight_decay * p if self.weight_decay else g
        if not self.momentum:
            return p - lr * d, {}
        b = self.momentum * state["momentum_buffer"] + d
        d = d + self.momentum * b if self.nesterov else b
        return p - lr * d, {"momentum_buffer": b}


class Adam(Optimizer):
    """m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    p <- p - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), with L2 weight decay added to g
    (Adam) or decoupled p <- p - lr wd p (AdamW)."""

    state_keys = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def rule(self, p, g, state, lr, t):
        if self.weight_decay and not self.decoupled:
            g = g + self.weight_decay * p
        if self.weight_decay and self.decoupled:
            p = p - lr * self.weight_decay * p
        m = self.b1 * state["exp_avg"] + (1.0 - self.b1) * g
        v = self.b2 * state["exp_avg_sq"] + (1.0 - self.b2) * (g * g)
        m_hat = m / (1.0 - self.b1 ** t)
        v_hat = v / (1.0 - self.b2 ** t)
        return p - lr * m_hat / (v_hat.sqrt() + self.eps), {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]
