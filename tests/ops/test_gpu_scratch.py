"""ops.gpu's per-thread scratch buffers belong to the array module that made them: one made
by a module that has died (a test's CuPy stand-in) is never handed to the next module that
CPython puts at the same address. Keyed by id(xp), a NumPy array reached a CuPy stand-in's
``sum(out=)`` in one full run of the suite."""

import numpy as np

from shardgrad.ops import gpu


class FakeModule:
    """An array module whose arrays are its own type (as CuPy's are not NumPy's)."""

    def __init__(self, kind):
        self.kind = kind

    def empty(self, shape, dtype):
        return (self.kind, np.empty(shape, dtype))


def test_a_dead_modules_buffer_is_not_the_next_ones():
    first = FakeModule("first")
    assert gpu._scratch(first, (3,), "float32")[0] == "first"
    del first
    # CPython gives the next object of the type the freed address (the case that failed);
    # whichever address it gets, its buffer is its own
    second = FakeModule("second")
    assert gpu._scratch(second, (3,), "float32")[0] == "second"
