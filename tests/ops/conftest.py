"""Fixtures for the op tests. The shared harness lives in op_harness.py beside this file;
pytest's importlib mode does not put test directories on sys.path, so this does."""

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

DEVICES = ["numpy"] + (["cupy"] if importlib.util.find_spec("cupy") else [])


@pytest.fixture(params=DEVICES)
def xp(request):
    """The array module: numpy always, cupy where CuPy and a GPU exist."""
    if request.param == "numpy":
        import numpy
        return numpy
    import cupy
    try:
        cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("CuPy is installed but no GPU is visible")
    return cupy
