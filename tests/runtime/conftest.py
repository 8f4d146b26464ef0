"""Fixtures the runtime tests share: ``cuda``, the array module a GPU test runs on."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import host_cupy  # noqa: E402

from shardgrad.runtime import device as D  # noqa: E402


@pytest.fixture(params=["host", pytest.param("gpu", marks=pytest.mark.gpu)])
def cuda(request, monkeypatch):
    """The array module standing for CuPy: host_cupy's stand-in, or CuPy on a real GPU."""
    if request.param == "gpu":
        if not D.cuda_available():
            pytest.skip("needs CuPy and a CUDA device")
        import cupy
        return cupy
    return host_cupy.install(host_cupy.device_module(), monkeypatch)
