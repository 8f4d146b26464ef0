"""Device selection on the CPU: parsing "cpu" | "cuda" | "cuda:N", which GPU a rank takes
(local rank modulo the visible devices, Ray's one visible GPU), clear errors, the array
module (cupy imported only when a GPU is asked for) and host transfers.
"""

import os
import sys

import numpy as np
import pytest

from shardgrad.graph import device as base
from shardgrad.runtime import device as D
from shardgrad.runtime.device import Device, DeviceError


@pytest.mark.parametrize("spec,kind,index", [
    ("cpu", "cpu", None), ("cuda", "cuda", None), ("cuda:0", "cuda", 0), ("cuda:3", "cuda", 3),
    (" CUDA:1 ", "cuda", 1), ("Cpu", "cpu", None),
])
def test_parse(spec, kind, index):
    d = Device.parse(spec)
    assert (d.kind, d.index) == (kind, index)
    assert Device.parse(str(d)) == d


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "", "cuda:1:2",
                                  "tpu:0"])
def test_parse_rejects(spec):
    with pytest.raises(DeviceError, match="device"):
        Device.parse(spec)


@pytest.mark.parametrize("spec,local_rank,count,want", [
    ("cpu", 3, 0, "cpu"), ("cuda", None, 4, "cuda:0"), ("cuda", 2, 4, "cuda:2"),
    ("cuda", 5, 4, "cuda:1"), ("cuda", 3, 1, "cuda:0"), ("cuda:1", 0, 2, "cuda:1"),
    ("cuda:2", None, None, "cuda:2"), ("cuda", 7, None, "cuda:0"),
])
def test_select(spec, local_rank, count, want):
    assert str(D.select(spec, local_rank, count)) == want


def test_select_errors_name_what_is_there():
    with pytest.raises(DeviceError, match="'cuda:2' is not among the 2 CUDA device"):
        D.select("cuda:2", 0, 2)
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        D.select("cuda", 0, 0)
    with pytest.raises(DeviceError, match="negative"):
        D.select("cuda", -1, 2)


def test_cpu_uses_numpy_and_never_imports_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)       # any import of cupy now fails
    assert D.xp_for("cpu") is np
    assert D.resolve("cpu") == Device("cpu")
    assert D.cuda_available() is False
    assert D.device_count() == 0
    with pytest.raises(DeviceError, match=r"CuPy is not installed: pip install -e '\.\[gpu\]'"):
        D.xp_for("cuda:0")
    with pytest.raises(DeviceError, match="CuPy is not installed"):
        D.resolve("cuda")


@pytest.fixture
def cupy_imports(monkeypatch):
    """resolve() imports CuPy before it counts the devices: let it, without a GPU."""
    monkeypatch.setattr(base, "_cupy", lambda: None)


def test_resolve_without_a_gpu_says_so(monkeypatch, cupy_imports):
    monkeypatch.setattr(D, "device_count", lambda: 0)
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        D.resolve("cuda", local_rank=0)


def test_resolve_takes_the_local_rank_gpu(monkeypatch, cupy_imports):
    monkeypatch.setattr(D, "device_count", lambda: 4)
    assert D.resolve("cuda", local_rank=6) == Device("cuda", 2)


def test_host_transfers_on_the_cpu():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert D.to_device(x, "cpu") is x
    assert D.to_device([1, 2], "cpu", dtype=np.float64).dtype == np.float64
    out = np.empty_like(x)
    assert D.to_host(x, out=out) is out and (out == x).all()
    assert not D.is_device_array(x)
    assert D.array_module(x) is np
    D.synchronize("cpu")
    assert D.use("cpu") is None


def test_an_explicit_index_needs_no_local_rank(monkeypatch, cupy_imports):
    monkeypatch.setattr(D, "device_count", lambda: 2)
    assert D.resolve("cuda:1") == Device("cuda", 1)



def test_malloc_thresholds_are_set_on_linux_unless_turned_off(monkeypatch):
    """Importing shardgrad keeps freed arrays' memory for the next eager step (glibc's mmap
    and trim thresholds, Linux); SHARDGRAD_MALLOC=0, or the user's own malloc tuning, leaves
    them alone."""
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    assert D.keep_freed_memory() == sys.platform.startswith("linux")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not D.keep_freed_memory()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("SHARDGRAD_MALLOC", "0")
    assert not D.keep_freed_memory()
