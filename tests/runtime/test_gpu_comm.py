"""GPU buffers through a Communicator, on the CPU: the staging decision as a pure function,
the CUDA-aware setting, and GPUCommunicator over real in-process ranks (ThreadCommunicator)
with stand-in device arrays that record the stream synchronizations and host copies. The
same paths on a GPU (CuPy arrays, pinned memory, NCCL) are in test_gpu_runtime.py.
"""

import ctypes
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from shardgrad.runtime.comm import SingleProcess
from shardgrad.runtime.gpu_comm import (
    GPUCommunicator,
    NCCLCommunicator,
    cuda_aware_setting,
    make_gpu_comm,
    probe_cuda_aware_mpi,
    transfer_mode,
)
from shardgrad.runtime.threadcomm import ThreadGroup


@pytest.mark.parametrize("on_device,aware,backend,want", [
    (False, False, "mpi", "host"), (False, True, "mpi", "host"), (False, False, "nccl", "host"),
    (True, False, "mpi", "stage"), (True, True, "mpi", "direct"), (True, False, "nccl", "nccl"),
    (True, True, "nccl", "nccl"),
])
def test_transfer_mode(on_device, aware, backend, want):
    assert transfer_mode(on_device, aware, backend) == want


def test_transfer_mode_rejects_unknown_backend():
    with pytest.raises(ValueError, match="'mpi' or 'nccl'"):
        transfer_mode(True, True, "gloo")


@pytest.mark.parametrize("setting,probe,want", [
    ("auto", True, True), ("auto", False, False), ("auto", None, False), ("on", None, True),
    ("on", False, True), ("off", True, False), (True, None, True), (False, True, False),
])
def test_cuda_aware_setting(setting, probe, want):
    assert cuda_aware_setting(setting, probe) is want


def test_cuda_aware_setting_rejects_junk():
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        cuda_aware_setting("maybe", None)


def test_probe_gives_the_mpi_librarys_own_answer():
    # Open MPI's ompi_info reports how the library was built: the probe must agree with it
    info = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    built = re.search(r"opal_built_with_cuda_support:value:(true|false)", info).group(1)
    assert probe_cuda_aware_mpi() is (built == "true")


class FakeDevice(np.ndarray):
    """A stand-in device array: a NumPy array that claims to live on a GPU and counts the
    copies through ``get``/``set`` (CuPy's names)."""

    log: list

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False)}

    def get(self, out=None):
        self.log.append("get")
        np.copyto(out, np.asarray(self))
        return out

    def set(self, arr):
        self.log.append("set")
        np.copyto(np.asarray(self), arr)


def fake_xp(log):
    stream = SimpleNamespace(synchronize=lambda: log.append("sync"))
    cuda = SimpleNamespace(get_current_stream=lambda: stream,
                           alloc_pinned_memory=lambda n: bytearray(n))
    return SimpleNamespace(cuda=cuda)


def device(values, log):
    arr = np.array(values, dtype=np.float32).view(FakeDevice)
    arr.log = log
    return arr


def run_ranks(n, fn):
    comms = ThreadGroup(n, timeout_s=10).communicators()
    out, errors = [None] * n, []

    def work(r):
        try:
            out[r] = fn(comms[r])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a rank's thread did not end within 20 s"
    assert not errors, errors
    return out


@pytest.mark.parametrize("aware", [False, True])
def test_allreduce_of_device_buffers(aware):
    def rank(comm):
        log = []
        g = GPUCommunicator(comm, cuda_aware=aware, xp=fake_xp(log))
        buf = device(np.arange(5) + 10 * comm.rank, log)
        g.allreduce_(buf)
        return np.asarray(buf).copy(), log, g.staged_bytes
    for values, log, staged in run_ranks(3, rank):
        np.testing.assert_array_equal(values, 3 * np.arange(5) + 30)
        assert log[0] == "sync"                       # the stream before anything leaves
        if aware:
            assert log == ["sync"] and staged == 0    # the buffer itself went to MPI
        else:
            assert log == ["sync", "get", "set", "sync"] and staged == 20


def test_host_buffers_pass_straight_through():
    def rank(comm):
        log = []
        g = GPUCommunicator(comm, xp=fake_xp(log))
        buf = np.ones(4, np.float32) * (comm.rank + 1)
        g.allreduce_(buf, "max")
        return buf, log
    for buf, log in run_ranks(2, rank):
        np.testing.assert_array_equal(buf, 2.0)
        assert log == []


def test_bcast_send_recv_allgather_staged():
    def rank(comm):
        log = []
        g = GPUCommunicator(comm, xp=fake_xp(log))
        b = device([comm.rank + 1.0] * 3, log)
        g.bcast_(b, root=1)
        x = device([comm.rank] * 2, log)
        out = device(np.zeros(4), log)
        g.allgather_(x, out)
        p = device([0.0, 0.0], log)
        if comm.rank == 0:
            g.send(device([7.0, 8.0], log), 1, tag=3)
        else:
            g.recv_(p, 0, tag=3)
        return np.asarray(b).copy(), np.asarray(out).copy(), np.asarray(p).copy()
    (b0, o0, p0), (b1, o1, p1) = run_ranks(2, rank)
    np.testing.assert_array_equal(b0, [2, 2, 2])
    np.testing.assert_array_equal(b1, [2, 2, 2])
    np.testing.assert_array_equal(o0, [0, 0, 1, 1])
    np.testing.assert_array_equal(p1, [7, 8])


@pytest.mark.parametrize("aware", [False, True])
def test_reduce_scatter_of_device_buffers(aware):
    def rank(comm):
        log = []
        g = GPUCommunicator(comm, cuda_aware=aware, xp=fake_xp(log))
        x = device(np.arange(6) * (comm.rank + 1), log)
        out = device(np.zeros(2), log)
        g.reduce_scatter_(x, out)
        host = np.zeros(2, np.float32)
        g.reduce_scatter_(np.arange(6, dtype=np.float32), host)   # host buffers pass through
        return np.asarray(out).copy(), host, log
    for r, (out, host, log) in enumerate(run_ranks(3, rank)):
        np.testing.assert_array_equal(out, np.arange(2 * r, 2 * r + 2) * 6)
        np.testing.assert_array_equal(host, np.arange(2 * r, 2 * r + 2) * 3)
        assert log == (["sync"] if aware else ["sync", "get", "set", "sync"])


def test_pinned_buffers_are_reused_per_size():
    log = []
    g = GPUCommunicator(SingleProcess(), xp=fake_xp(log))
    for _ in range(3):
        g.allreduce_(device([1.0, 2.0], log))
    g.allreduce_(device([1.0, 2.0, 3.0], log))
    assert len(g._pinned) == 2


def test_make_gpu_comm_follows_the_config():
    assert make_gpu_comm(SingleProcess(), "mpi", "on").cuda_aware is True
    assert make_gpu_comm(SingleProcess(), "mpi", "auto", probe=False).cuda_aware is False
    assert make_gpu_comm(SingleProcess(), "mpi", "off", probe=True).cuda_aware is False
    with pytest.raises(ValueError, match="'mpi' or 'nccl'"):
        make_gpu_comm(SingleProcess(), "tcp")


class FakeNccl:
    """cupy.cuda.nccl over threads: each NcclCommunicator reads and writes the device memory
    its calls name by pointer, as NCCL does, so NCCLCommunicator's pointers, counts, dtypes,
    roots and the unique id's broadcast are exercised on several ranks without a GPU."""

    NCCL_SUM, NCCL_MAX, NCCL_MIN = 0, 1, 2
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT32, NCCL_INT64, NCCL_UINT8, NCCL_INT8 = \
        range(7)
    DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.int8]

    def __init__(self):
        self.groups, self.lock = {}, threading.Lock()

    def get_unique_id(self):
        return tuple(np.random.default_rng().integers(0, 256, 128).tolist())

    def NcclCommunicator(self, n, uid, rank):   # noqa: N802 - cupy's name
        with self.lock:
            group = self.groups.setdefault(uid, SimpleNamespace(
                barrier=threading.Barrier(n, timeout=10), slots=[None] * n, ranks=set()))
            assert rank not in group.ranks, "two ranks joined under one id and rank"
            group.ranks.add(rank)
        return _FakeNcclComm(self, group, rank)


class _FakeNcclComm:
    def __init__(self, nccl, group, rank):
        self.nccl, self.group, self.rank = nccl, group, rank

    def _view(self, ptr, count, dtype):
        kind = self.nccl.DTYPES[dtype]
        buf = (ctypes.c_byte * (count * np.dtype(kind).itemsize)).from_address(ptr)
        return np.frombuffer(buf, dtype=kind)

    def _exchange(self, value):
        g = self.group
        g.slots[self.rank] = value
        g.barrier.wait()
        values = list(g.slots)
        g.barrier.wait()
        return values

    def allReduce(self, send, recv, count, dtype, op, stream):   # noqa: N802 - cupy's name
        parts = self._exchange(self._view(send, count, dtype).copy())
        reduce = [np.sum, np.max, np.min][op]
        self._view(recv, count, dtype)[:] = reduce(np.stack(parts), axis=0)

    def bcast(self, ptr, count, dtype, root, stream):
        parts = self._exchange(self._view(ptr, count, dtype).copy())
        self._view(ptr, count, dtype)[:] = parts[root]

    def reduceScatter(self, send, recv, count, dtype, op, stream):   # noqa: N802 - cupy's name
        parts = self._exchange(self._view(send, count * len(self.group.slots), dtype).copy())
        reduce = [np.sum, np.max, np.min][op]
        block = reduce(np.stack(parts), axis=0)[self.rank * count:(self.rank + 1) * count]
        self._view(recv, count, dtype)[:] = block

    def allGather(self, send, recv, count, dtype, stream):   # noqa: N802 - cupy's name
        parts = self._exchange(self._view(send, count, dtype).copy())
        self._view(recv, count * len(parts), dtype)[:] = np.concatenate(parts)


class NcclDevice(FakeDevice):
    @property
    def data(self):   # CuPy's device pointer
        return SimpleNamespace(ptr=self.ctypes.data)


def test_nccl_communicator_on_three_ranks(monkeypatch):
    nccl = FakeNccl()
    cuda = SimpleNamespace(nccl=nccl)
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)

    def rank(comm):
        log = []
        xp = fake_xp(log)
        xp.cuda.get_current_stream().ptr = 0
        g = NCCLCommunicator(comm, xp=xp)
        r = comm.rank
        total = np.array([1.5, -2.0, 4.0], np.float32) * (r + 1)
        total = total.view(NcclDevice)
        total.log = log
        g.allreduce_(total)
        biggest = (np.arange(4, dtype=np.int64) * (r - 1)).view(NcclDevice)
        biggest.log = log
        g.allreduce_(biggest, "max")
        root = (np.full(5, r, np.float64)).view(NcclDevice)
        root.log = log
        g.bcast_(root, root=2)
        out = np.zeros(6, np.int32).view(NcclDevice)
        out.log = log
        g.allgather_(np.array([r, 10 * r], np.int32).view(NcclDevice), out)
        host = np.ones(2) * r
        g.allreduce_(host)                              # host buffers go to the inner comm
        block = np.zeros(2, np.float64).view(NcclDevice)
        block.log = log
        g.reduce_scatter_(np.arange(6.0).view(NcclDevice) * (r + 1), block)
        return [np.asarray(a).copy() for a in (total, biggest, root, out, host, block)], log
    results = run_ranks(3, rank)
    assert len(nccl.groups) == 1                        # one id, broadcast from rank 0
    for r, ((total, biggest, root, out, host, block), log) in enumerate(results):
        np.testing.assert_array_equal(block, np.arange(2.0 * r, 2.0 * r + 2) * 6)
        np.testing.assert_array_equal(total, np.array([1.5, -2.0, 4.0], np.float32) * 6)
        np.testing.assert_array_equal(biggest, np.arange(4) * 1)
        np.testing.assert_array_equal(root, np.full(5, 2.0))
        np.testing.assert_array_equal(out, [0, 0, 1, 10, 2, 20])
        np.testing.assert_array_equal(host, [3.0, 3.0])
        assert log.count("sync") == 5 and "get" not in log   # nothing staged through the host
