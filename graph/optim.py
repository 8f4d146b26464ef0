"""Optimizers (``sg.optim``): SGD, Adam, AdamW, RMSprop, Adagrad, with torch's param groups.

Each update rule is written once on Tensors, so it runs eagerly in ``step()`` and traces into
the training-step Graph (lr and the step count are its inputs). State is a dict of tensors
per parameter. Imports graph.tensor and graph.device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping

import numpy as np

from shardgrad.graph.device import copy_of, to_device
from shardgrad.graph.tensor import Tensor, no_grad, value_of, zeros
from shardgrad.ops.registry import cpu_updates


def _check_param(p, where: str) -> None:
    """TypeError unless ``p`` is a Tensor, ValueError if it is computed (not a leaf), as
    torch's optimizers check their params; ``where`` names it in the message."""
    if not isinstance(p, Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but {where} is "
                        f"{type(p).__module__}.{type(p).__qualname__}")
    if p.requires_grad and not p.is_symbolic and p.node.op != "input":
        raise ValueError(f"can't optimize a non-leaf Tensor ({where}, computed by {p.node.op})")


class ParamGroup(MutableMapping):
    """A parameter group as torch code sees it (``opt.param_groups[i]``): "params" and the
    hyper-parameters. Group 0's are the optimizer's attributes; another group's are its own
    values (given in its dict, else the optimizer's defaults when it was made). Writes change
    the next eager and compiled step (``g["lr"] = x``: an LR schedule). Other keys (e.g. a
    scheduler's "initial_lr") are kept for the caller, as in torch's dict, unused."""

    def __init__(self, optimizer: Optimizer, index: int = 0):
        self._opt, self._i = optimizer, index

    def _keys(self) -> tuple[str, ...]:
        return ("params", "lr", *self._opt.defaults, *self._extras())

    def _extras(self) -> dict:
        return self._opt.group_extras if self._i == 0 else self._opt._groups[self._i]["extras"]

    def __getitem__(self, key):
        if key in self._extras():
            return self._extras()[key]
        if key not in self._keys():
            raise KeyError(key)
        if key == "params":
            return [p for p, g in zip(self._opt.params, self._opt._group_of, strict=True)
                    if g == self._i]
        if self._i:
            return self._opt._groups[self._i]["values"][key]
        return getattr(self._opt, key)

    def __setitem__(self, key, value) -> None:
        if key == "params":
            raise KeyError("a param group's 'params' are fixed: build a new optimizer")
        if key not in ("lr", *self._opt.defaults):
            self._extras()[key] = value
        elif self._i == 0:
            self._opt.set_hyperparameter(key, value)
        else:
            self._opt._check_group_value(key, value)
            self._opt._groups[self._i]["values"][key] = value

    def __delitem__(self, key) -> None:
        if key not in self._extras():
            raise KeyError(f"a param group's {key!r} cannot be deleted")
        del self._extras()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        return repr({k: self[k] for k in self._keys() if k != "params"})


def _check(name: str, value, ok: bool) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value}")


def global_norm(grads: Iterable[Tensor], reduce=None) -> Tensor:
    """The L2 norm of all ``grads`` together: sqrt of the sum of their squares, the sum
    passed through ``reduce`` first when given (a pipeline stage adds the other stages'
    sums of squares there: an allreduce over its stages)."""
    total = None
    for g in grads:
        sq = (g * g).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("global_norm of no gradients")
    return (reduce(total) if reduce is not None else total).sqrt()


def clip_grad_norm(grads: dict, max_norm: float | None,
                   norm: Tensor | None = None) -> dict:
    """``grads`` (Tensors, eager or traced) scaled by min(1, max_norm / (||g|| + 1e-6)), ||g||
    the L2 norm of all of them together (``norm`` if given, else ``global_norm``), as
    torch.nn.utils.clip_grad_norm_ (``max_norm`` None or 0: unchanged). In a traced step it
    reads the gradients data parallelism averaged."""
    if not max_norm or not grads:
        return grads
    norm = global_norm(grads.values()) if norm is None else norm
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return {k: g * coef for k, g in grads.items()}


class Optimizer:
    """Holds the parameters, hyper-parameters and per-parameter state.

    ``rule(p, g, state, lr, t) -> (new_p, new_state)`` is the update for one parameter;
    ``p``, ``g`` and the state are Tensors (eager or traced), ``lr`` and ``t`` (the 1-based
    step count) numbers or scalar Tensors. ``param_groups`` shows the groups as torch does;
    group 0's hyper-parameters are this object's attributes (``defaults`` names them), which
    ``hyperparameters()`` lists (with the other groups') for a compiled step to retrace on
    change.
    """

    state_keys: tuple[str, ...] = ()
    #: clip the gradients' global L2 norm to this before each update (None: off), eager or
    #: compiled, as calling torch.nn.utils.clip_grad_norm_ before every optimizer.step()
    max_grad_norm: float | None = None

    def __init__(self, params: Iterable[Tensor], lr: float, **defaults):
        if isinstance(params, Tensor):
            raise TypeError(f"params argument given to the optimizer should be an iterable of "
                            f"Tensors, but got a Tensor of shape {params.shape}")
        params = list(params)
        # parameter groups, as torch: dicts of "params" and the hyper-parameters that differ
        # from the defaults (given here); group 0's values become this object's attributes
        groups = params if params and all(isinstance(g, dict) for g in params) else [
            {"params": params}]
        # the constructor's values, which add_param_group fills a new group's gaps from (as
        # torch's ``defaults``: group 0's own values and later writes to them do not count)
        self._init_defaults = {"lr": lr, **defaults}
        self._group_of: list[int] = []
        self._groups: list[dict] = []
        flat = []
        for gi, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"{type(self).__name__}: param group {gi} must be a dict with "
                                f"'params' (all groups dicts, or all entries tensors)")
            unknown = sorted(set(group) - {"params", "lr", *defaults})
            if unknown:
                raise ValueError(f"{type(self).__name__}: param group {gi} has unknown keys "
                                 f"{unknown} (known: lr, {', '.join(defaults)})")
            members = group["params"]
            members = [members] if isinstance(members, Tensor) else list(members)
            flat += members
            self._group_of += [gi] * len(members)
            values = {"lr": group.get("lr", lr)} | {k: group.get(k, v)
                                                    for k, v in defaults.items()}
            self._groups.append({"values": values, "extras": {}})
        if len(groups) > 1:
            for k, v in [(k, v) for g in self._groups for k, v in g["values"].items()]:
                self._check_group_value(k, v)
        lr = self._groups[0]["values"].pop("lr")
        defaults = self._groups[0]["values"]
        self.params = []
        group_of: list[int] = []
        seen: set[int] = set()
        for i, p in enumerate(flat):
            if isinstance(p, dict):
                raise TypeError(f"{type(self).__name__}: mix of parameter groups (dicts) and "
                                f"tensors: give all as dicts")
            _check_param(p, f"params[{i}]")
            if id(p) not in seen:             # listed twice: one update per step, as traced
                seen.add(id(p))
                self.params.append(p)
                group_of.append(self._group_of[i])
            elif group_of[[id(q) for q in self.params].index(id(p))] != self._group_of[i]:
                raise ValueError("some parameters appear in more than one parameter group")
        self._group_of = group_of
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        _check("learning rate (lr)", lr, lr >= 0)
        self.lr = float(lr)
        self.defaults = defaults
        for k, v in defaults.items():           # group 0's values (its dict's, or the defaults)
            setattr(self, k, v)
        self.group_extras: dict = {}
        self.t = 0
        self.state: list[dict[str, Tensor]] = [self._new_state(i)
                                               for i in range(len(self.params))]

    @property
    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup(self, i) for i in range(len(self._groups))]

    def add_param_group(self, group: dict) -> None:
        """Add a group of parameters, as torch's (e.g. layers unfrozen while fine-tuning): the
        hyper-parameters it does not give are the constructor's; its parameters get fresh
        state. A parameter the optimizer already holds is a ValueError. A step compiled
        before must be made again (``compile_step``): its state feeds are fixed."""
        name = type(self).__name__
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{name}.add_param_group: a param group must be a dict with "
                            f"'params', got {type(group).__name__}")
        unknown = sorted(set(group) - {"params", *self._init_defaults})
        if unknown:
            raise ValueError(f"{name}.add_param_group: unknown keys {unknown} "
                             f"(known: {', '.join(self._init_defaults)})")
        members = group["params"]
        if isinstance(members, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs. "
                            "Please use a list instead.")
        members = [members] if isinstance(members, Tensor) else list(members)
        held = {id(p) for p in self.params}
        new: list[Tensor] = []
        for i, p in enumerate(members):
            _check_param(p, f"the group's params[{i}]")
            if id(p) in held:
                raise ValueError("some parameters appear in more than one parameter group")
            if id(p) not in {id(q) for q in new}:
                new.append(p)
        if not new:
            raise ValueError(f"{name}.add_param_group got an empty parameter list")
        values = {k: group.get(k, v) for k, v in self._init_defaults.items()}
        for k, v in values.items():
            self._check_group_value(k, v)
        gi = len(self._groups)
        # its parameters' step count starts here, as torch's per-parameter "step" (Adam's
        # bias correction, Adagrad's lr_decay): the rule sees t minus the steps taken before
        self._groups.append({"values": values, "extras": {}, "first_step": self.t})
        for p in new:
            self.params.append(p)
            self._group_of.append(gi)
            self.state.append(self._new_state(len(self.params) - 1))

    def _new_state(self, i: int) -> dict[str, Tensor]:
        """Fresh state for parameter ``i``: zeros of its shape per ``state_keys``."""
        p = self.params[i]
        return {k: zeros(p.shape, dtype=p.dtype, device=p.device) for k in self.state_keys}

    def _check_group_value(self, key: str, value) -> None:
        """A value a group other than 0 may take (a subclass refuses what its state or
        rule cannot follow per group)."""
        if key == "lr":
            _check("learning rate (lr)", value, value >= 0)

    def group_rule(self, i: int, p, g, state, lr, t):
        """``rule`` for parameter ``i`` with its group's hyper-parameters: group 0 as the
        attributes are; another group's values set on this object for the call, and lr
        scaled by its lr over group 0's (lr may be the traced step's input)."""
        gi = self._group_of[i]
        if gi == 0:
            return self.rule(p, g, state, lr, t)
        values = self._groups[gi]["values"]
        t = t - self._groups[gi].get("first_step", 0)
        saved = {k: getattr(self, k) for k in self.defaults}
        try:
            for k in self.defaults:
                setattr(self, k, values[k])
            if isinstance(lr, Tensor):
                if self.lr == 0:
                    raise ValueError("a compiled step with parameter groups needs a non-zero lr "
                                     "in group 0 (the others' lr are traced as ratios to it)")
                lr = lr * (values["lr"] / self.lr)
            else:
                lr = values["lr"]
            return self.rule(p, g, state, lr, t)
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def set_hyperparameter(self, key: str, value) -> None:
        """Set ``lr`` or one of ``defaults`` (as ``param_groups[0][key] = value``). lr is a
        graph input, not a rule constant: it stays out of ``defaults`` (a new lr retraced
        the compiled step, every step of an LR schedule)."""
        if key == "lr":        # unchecked, as torch's param_groups (OneCycleLR's last
            self.lr = float(value)     # linear step goes just below 0)
            return
        setattr(self, key, value)
        self.defaults[key] = value

    def hyperparameters(self) -> tuple:
        """The values the update rule reads as constants (lr and t are graph inputs; another
        group's lr is its ratio to group 0's, which a schedule scaling every group keeps)."""
        others = tuple((i, tuple(sorted(
            (k, v / self.lr if k == "lr" and self.lr else v) for k, v in g["values"].items())),
            g.get("first_step")) for i, g in enumerate(self._groups) if i)
        return tuple((k, getattr(self, k)) for k in self.defaults) + (
            ("max_grad_norm", self.max_grad_norm),) + others

    def rule(self, p, g, state, lr, t):
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (or, with ``set_to_none=False``, zero those there are)."""
        for p in self.params:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = zeros(p.shape, dtype=p.dtype, device=p.device)

    def step(self) -> None:
        """One eager update of every parameter that has a gradient."""
        self.t += 1
        with no_grad():
            grads = clip_grad_norm({id(p): p.grad for p in self.params if p.grad is not None},
                                   self.max_grad_norm)
            live = [(p, st) for p, st in zip(self.params, self.state, strict=True)
                    if p.grad is not None]
            for p, st in live:
                for v in st.values():      # the model may have moved since (Module.to)
                    if v.device != p.device:
                        v._set_leaf(to_device(v.data, p.device))
            if _fused_step(self, live, grads):
                return
            index = {id(p): i for i, p in enumerate(self.params)}
            for p, st in live:
                new_p, new_state = self.group_rule(index[id(p)], p.detach(), grads[id(p)], st,
                                                    self.lr, self.t)
                p.data = new_p.data
                for k, v in new_state.items():
                    st[k].assign_(v)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays by ``<param index>.<key>``, plus ``step`` and, for a group added by
        ``add_param_group``, ``group<i>.first_step`` (safetensors-ready)."""
        out = {f"{i}.{k}": v.numpy().copy() for i, st in enumerate(self.state)
               for k, v in st.items()}
        out["step"] = np.asarray(self.t, dtype=np.int64)
        out.update({f"group{gi}.first_step": np.asarray(g["first_step"], dtype=np.int64)
                    for gi, g in enumerate(self._groups) if "first_step" in g})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Take the arrays of ``state_dict()``; different keys or a mis-shaped entry are an
        error naming them (nothing is loaded then)."""
        want = set(self.state_dict())
        if set(state) != want:
            raise KeyError(f"optimizer state keys differ: missing {sorted(want - set(state))}, "
                           f"unexpected {sorted(set(state) - want)}")
        shaped = [f"{i}.{k}: expected {v.shape}, got {tuple(np.shape(state[f'{i}.{k}']))}"
                  for i, st in enumerate(self.state) for k, v in st.items()
                  if tuple(np.shape(state[f"{i}.{k}"])) != v.shape]
        shaped += [f"{k}: expected (), got {tuple(np.shape(state[k]))}" for k in sorted(want)
                   if (k == "step" or k.startswith("group")) and np.shape(state[k]) != ()]
        if shaped:
            raise ValueError(f"{type(self).__name__}.load_state_dict: mis-shaped entries "
                             f"[{'; '.join(shaped)}]")
        for i, st in enumerate(self.state):
            for k in st:
                st[k].data = copy_of(value_of(state[f"{i}.{k}"]))   # its own, as Module's
        self.t = int(state["step"])
        for gi, g in enumerate(self._groups):
            if "first_step" in g:
                g["first_step"] = int(state[f"group{gi}.first_step"])


class SGD(Optimizer):
    """p <- p - lr * d, with d = g + wd p, and with momentum mu: b <- mu b + (1 - dampening) d
    (b <- d at the first step); d = b (or d + mu b with Nesterov), as torch.optim.SGD."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        _check("momentum value", momentum, momentum >= 0)
        _check("weight_decay value", weight_decay, weight_decay >= 0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.state_keys = ("momentum_buffer",) if momentum else ()
        kw = {"dampening": dampening} if dampening else {}    # (a rule constant only if used)
        super().__init__(params, lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, **kw)
        self.dampening = self.defaults.get("dampening", 0.0)

    def _check_group_value(self, key: str, value) -> None:
        super()._check_group_value(key, value)
        if key == "momentum" and bool(value) != bool(self.state_keys):
            raise ValueError(f"SGD: a param group's momentum={value} differs in kind from the "
                             f"optimizer's: momentum buffers exist for all parameters or none; "
                             f"give every group a momentum > 0, or none")

    def set_hyperparameter(self, key: str, value) -> None:
        if key == "momentum" and bool(value) != bool(self.state_keys):
            raise ValueError(f"{type(self).__name__} built with momentum={self.momentum} cannot "
                             f"switch to momentum={value} (its momentum buffers exist only "
                             f"with momentum > 0): build a new optimizer")
        if key == "nesterov" and value and self.momentum <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        super().set_hyperparameter(key, value)

    def rule(self, p, g, state, lr, t):
        d = g + self.weight_decay * p if self.weight_decay else g
        if not self.momentum:
            return p - lr * d, {}
        if self.dampening:
            # torch's buffer starts as d itself (undamped) at the first step: b = 0 then
            first = (t == 1) if not isinstance(t, Tensor) else (t == 1.0).astype(d.dtype)
            d_in = d * (1.0 - self.dampening + self.dampening * first)
        else:
            d_in = d
        b = self.momentum * state["momentum_buffer"] + d_in
        d = d + self.momentum * b if self.nesterov else b
        return p - lr * d, {"momentum_buffer": b}


class Adam(Optimizer):
    """m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    p <- p - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), with L2 weight decay added to g
    (Adam) or decoupled p <- p - lr wd p (AdamW)."""

    state_keys = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        for i, b in enumerate(betas):
            _check(f"beta parameter at index {i} (betas)", b, 0.0 <= b < 1.0)
        _check("epsilon value (eps)", eps, eps >= 0)
        _check("weight_decay value", weight_decay, weight_decay >= 0)
        # AMSGrad keeps the largest v seen (state max_exp_avg_sq) and divides by it
        self.state_keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        kw = {"amsgrad": True} if amsgrad else {}        # (a rule constant only if used)
        super().__init__(params, lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         **kw)
        self.amsgrad = bool(amsgrad)

    def _check_group_value(self, key: str, value) -> None:
        super()._check_group_value(key, value)
        if key == "amsgrad" and bool(value) != ("max_exp_avg_sq" in self.state_keys):
            raise ValueError("Adam: amsgrad must be the same for every param group")

    @property
    def betas(self) -> tuple[float, float]:
        return (self.b1, self.b2)

    @betas.setter
    def betas(self, value) -> None:
        self.b1, self.b2 = (float(b) for b in value)

    def rule(self, p, g, state, lr, t):
        if self.weight_decay and not self.decoupled:
            g = g + self.weight_decay * p
        if self.weight_decay and self.decoupled:
            p = p - lr * self.weight_decay * p
        m = self.b1 * state["exp_avg"] + (1.0 - self.b1) * g
        v = self.b2 * state["exp_avg_sq"] + (1.0 - self.b2) * (g * g)
        m_hat = m / (1.0 - self.b1 ** t)
        new = {"exp_avg": m, "exp_avg_sq": v}
        if self.amsgrad:
            v = new["max_exp_avg_sq"] = state["max_exp_avg_sq"].max(v)
        v_hat = v / (1.0 - self.b2 ** t)
        return p - lr * m_hat / (v_hat.sqrt() + self.eps), new


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)



class RMSprop(Optimizer):
    """v <- alpha v + (1-alpha) g^2 (g with L2 weight decay added); centered: a <- alpha a +
    (1-alpha) g and v - a^2 in v's place; d = g / (sqrt(v) + eps); with momentum mu:
    b <- mu b + d, d = b; p <- p - lr d, as torch.optim.RMSprop."""

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False):
        _check("epsilon value", eps, eps >= 0)
        _check("momentum value", momentum, momentum >= 0)
        _check("weight_decay value", weight_decay, weight_decay >= 0)
        _check("alpha value", alpha, alpha >= 0)
        self.state_keys = ("square_avg",) + (("momentum_buffer",) if momentum else ()) + (
            ("grad_avg",) if centered else ())
        super().__init__(params, lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)

    def _kind_error(self, key: str, value) -> str | None:
        """Why ``key`` = ``value`` cannot be a group's or a new value: momentum buffers and
        centred averages exist for all parameters or none (as the state was made)."""
        state = {"momentum": "momentum_buffer", "centered": "grad_avg"}.get(key)
        if state is not None and bool(value) != (state in self.state_keys):
            return (f"RMSprop: {key}={value} differs in kind from the optimizer's: its {state} "
                    f"state exists for all parameters or none; give every group {key} alike "
                    f"(or build a new optimizer)")
        return None

    def _check_group_value(self, key: str, value) -> None:
        super()._check_group_value(key, value)
        why = self._kind_error(key, value)
        if why:
            raise ValueError(why)

    def set_hyperparameter(self, key: str, value) -> None:
        why = self._kind_error(key, value)
        if why:
            raise ValueError(why)
        super().set_hyperparameter(key, value)

    def rule(self, p, g, state, lr, t):
        if self.weight_decay:
            g = g + self.weight_decay * p
        v = self.alpha * state["square_avg"] + (1.0 - self.alpha) * (g * g)
        new = {"square_avg": v}
        if self.centered:
            a = new["grad_avg"] = self.alpha * state["grad_avg"] + (1.0 - self.alpha) * g
            v = v - a * a
        d = g / (v.sqrt() + self.eps)
        if self.momentum:
            d = new["momentum_buffer"] = self.momentum * state["momentum_buffer"] + d
        return p - lr * d, new


class Adagrad(Optimizer):
    """s <- s + g^2 (s starts at initial_accumulator_value, the constructor's for every group
    as torch's; g with L2 weight decay added);
    p <- p - lr / (1 + (t-1) lr_decay) * g / (sqrt(s) + eps), as torch.optim.Adagrad."""

    state_keys = ("sum",)

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10):
        _check("lr_decay value", lr_decay, lr_decay >= 0)
        _check("weight_decay value", weight_decay, weight_decay >= 0)
        _check("initial_accumulator_value value", initial_accumulator_value,
               initial_accumulator_value >= 0)
        _check("epsilon value", eps, eps >= 0)
        super().__init__(params, lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps)

    def _new_state(self, i: int) -> dict[str, Tensor]:
        state = super()._new_state(i)
        # torch's value: the constructor's for every group (a group's own is kept, unread)
        init = self._init_defaults["initial_accumulator_value"]
        if init:
            state["sum"].data = state["sum"].data + init
        return state

    def rule(self, p, g, state, lr, t):
        if self.weight_decay:
            g = g + self.weight_decay * p
        s = state["sum"] + g * g
        if self.lr_decay:
            lr = lr / (1.0 + (t - 1.0) * self.lr_decay)
        return p - lr * (g / (s.sqrt() + self.eps)), {"sum": s}

def _fused_kind(opt: Optimizer) -> str | None:
    """Which ops.gpu update kernel computes ``opt``'s rule: its class's own, not overridden."""
    rule = type(opt).rule
    if getattr(opt, "dampening", 0) or getattr(opt, "amsgrad", False) or len(opt._groups) > 1:
        return None       # the kernels have no dampening nor AMSGrad, and one set of values
    return "sgd" if rule is SGD.rule else "adam" if rule is Adam.rule else None


def _writable(t: Tensor):
    """``t``'s array, which the fused update writes into: made C-contiguous and writable
    first (a broadcast, transposed or read-only value gets its own copy, once)."""
    a = t.data
    flags = a.flags
    if not flags.c_contiguous or not flags.writeable:
        t._set_leaf(a.copy(order="C"))
        a = t.data
    return a


def _fused_step(opt: Optimizer, live: list, grads: dict) -> bool:
    """The eager update as torch's fused multi-tensor optimizers: SGD's or Adam's rule over
    every parameter and its state in place, in one pass, by ops.gpu's kernels (a launch per
    48 parameters of a dtype) for parameters on a GPU, by the CPU runtime's on the intra-op
    pool (runtime.native through ops.registry.cpu_updates; ops/cpu/update.c) for NumPy
    parameters, or, where C is off, SGD's float ops with NumPy in place. The rule op by op
    made fresh arrays and a node and a dispatch an op: a third of an eager MLP step's time
    beyond torch's. In place, as torch's optimizers: a tensor sharing a parameter's memory
    (``p.detach()``) sees the new value. The CPU updates give the rule's values bit for bit
    (each float op in the rule's order, rounded to the dtype). False (the rule runs op by op)
    for a rule of another class, parameters on different devices, a dtype the kernels lack,
    or, on the CPU, a gradient of another dtype or shape."""
    kind = _fused_kind(opt)
    if kind is None or not live:
        return False
    if all(p.device.is_cuda for p, _ in live):
        from shardgrad.ops import gpu
        if not all(str(p.dtype) in gpu.CTYPES for p, _ in live):
            return False
        impl, flat = gpu, True                  # ops.gpu's kernels take them raveled
    else:
        for p, _ in live:
            g = grads[id(p)]
            g = g.data if isinstance(g, Tensor) else g
            if (type(p.data) is not np.ndarray or p.dtype not in ("float32", "float64")
                    or type(g) is not np.ndarray or g.dtype != p.dtype or g.shape != p.shape):
                return False
        impl, flat = cpu_updates(), False
        if impl is not None and not impl.ready():
            impl = None                         # C off or not built here
        if kind == "adam" and impl is None:
            return False
    lists: dict[np.dtype, list[list]] = {}     # by dtype: parameters, gradients, states
    keys = ("momentum_buffer",) if kind == "sgd" and opt.momentum else (
        ("exp_avg", "exp_avg_sq") if kind == "adam" else ())
    for p, st in live:
        arr = _writable(p)
        g = grads[id(p)]
        g = g.data if isinstance(g, Tensor) else g
        if not g.flags.c_contiguous or g.dtype != arr.dtype:
            g = g.astype(arr.dtype, order="C")
        cols = lists.get(arr.dtype)
        if cols is None:
            cols = lists[arr.dtype] = [[] for _ in range(2 + len(keys))]
        for col, a in zip(cols, [arr, g] + [_writable(st[k]) for k in keys], strict=True):
            col.append(a.reshape(-1) if flat else a)
    if impl is not None:
        for ps, gs, *states in lists.values():
            if kind == "sgd":
                impl.sgd_multi_(ps, gs, states[0] if states else None, lr=opt.lr,
                                momentum=opt.momentum, weight_decay=opt.weight_decay,
                                nesterov=opt.nesterov)
            else:
                impl.adam_multi_(ps, gs, *states, lr=opt.lr, step=opt.t,
                                 betas=(opt.b1, opt.b2), eps=opt.eps,
                                 weight_decay=opt.weight_decay, decoupled=opt.decoupled)
        return True
    if kind != "sgd":               # the CPU runtime is off or not built: the rule op by op
        return False
    for ps, gs, *states in lists.values():      # SGD's float ops with NumPy, in place
        for k, (arr, d) in enumerate(zip(ps, gs, strict=True)):
            f = arr.dtype.type
            if opt.weight_decay:
                d = d + f(opt.weight_decay) * arr                # d = g + wd p
            if opt.momentum:
                b = states[0][k]
                np.multiply(b, f(opt.momentum), out=b)           # b = mu b + d
                np.add(b, d, out=b)
                d = d + f(opt.momentum) * b if opt.nesterov else b
            np.subtract(arr, f(opt.lr) * d, out=arr)             # p = p - lr d
    return True


__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "clip_grad_norm",
           "global_norm"]
