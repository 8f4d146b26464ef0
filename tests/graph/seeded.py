"""Small float64 models drawn from a fixed seed, built alike by the tests that compare runs
(ZeRO, the training knobs, GELU, the schedulers), and their PyTorch twins. Imported by path
(tests are not a package)."""

import contextlib

import shardgrad as sg


@contextlib.contextmanager
def float64_seeded(seed: int = 0):
    """Inside: the default dtype is float64 and parameters are drawn after
    ``manual_seed(seed)``; the default dtype is restored after."""
    saved = sg.get_default_dtype()
    sg.set_default_dtype("float64")
    try:
        sg.manual_seed(seed)
        yield
    finally:
        sg.set_default_dtype(saved)


def mlp(d_in: int, hidden: int, d_out: int, act=sg.nn.ReLU, seed: int = 0) -> sg.nn.Sequential:
    """``Linear(d_in, hidden), act(), Linear(hidden, d_out)`` in float64, drawn from ``seed``."""
    with float64_seeded(seed):
        return sg.nn.Sequential(sg.nn.Linear(d_in, hidden), act(), sg.nn.Linear(hidden, d_out))


def torch_twin(model: sg.nn.Module, ref):
    """``ref``, a torch module of ``model``'s layout, in float64 with ``model``'s parameters."""
    import torch

    ref = ref.double()
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            v.copy_(torch.tensor(model.state_dict()[k]))
    return ref


__all__ = ["float64_seeded", "mlp", "torch_twin"]
