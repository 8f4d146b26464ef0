"""Every CUDA source compiles for the H100/H200 (``nvcc -ptx -arch=sm_90``, with the flags
CuPy's RawModule gives NVRTC: ``-std=c++14`` by default, ``-ftz=true`` always): each
hand-written kernel file of ops/cuda for float and double, as ops.gpu.source hands it to NVRTC
(its shared headers, ops/cuda/*.cuh, pasted in), and the fused kernels generated for the groups
of the test graphs, plain and as the GPU executor builds them (views read in place; one
translation unit); and each kernel, built for sm_90 by ptxas, fits the block size ops.gpu
launches it with (registers and static shared memory: a kernel over the limit compiles but
fails every launch). Skipped only where nvcc is absent. Also checks that the sources stay
NVRTC-compatible (no system #include: NVRTC has no standard headers; only ops/cuda headers,
which source() inlines) and that every kernel ops.gpu launches is defined.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cuda_cases import elementwise_graph, training_graphs

from shardgrad.graph import passes
from shardgrad.ops import codegen, gpu
from shardgrad.runtime import gpu_step
from shardgrad.runtime.gpu import FusedKernel

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
SOURCES = sorted(gpu.SOURCES.glob("*.cu"))
HEADERS = sorted(gpu.SOURCES.glob("*.cuh"))
CUPY_FLAGS = ("-std=c++14", "-ftz=true")
INCLUDE = re.compile(r"^\s*#\s*include\s*(\S+)", re.M)


def _nvcc(src: Path, out: Path, *flags: str) -> tuple[str, int, str]:
    cmd = [NVCC, "-ptx", "-arch=sm_90", *CUPY_FLAGS, *flags, str(src), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    return " ".join(cmd), done.returncode, done.stderr


def _generated_unit() -> str:
    kernels: dict[str, str] = {}
    for graph, _ in [elementwise_graph(), *training_graphs().values()]:
        for group in passes.fusion_groups(graph):
            for src in (codegen.fused_source(group), FusedKernel(group).src):
                kernels[src.name] = src.code
    return "\n".join(kernels.values())


def test_sources_are_nvrtc_compatible():
    assert SOURCES, "no CUDA sources found in ops/cuda"
    included = set()
    for path in SOURCES + HEADERS:
        names = INCLUDE.findall(path.read_text())
        for name in names:
            assert name.startswith('"') and (gpu.SOURCES / name.strip('"')).is_file(), (
                f"{path.name} includes {name}: NVRTC has no standard headers; only "
                f"ops/cuda headers, which gpu.source inlines")
        included.update(name.strip('"') for name in names)
    for path in SOURCES:
        assert not INCLUDE.search(gpu.source(path.name)), path.name
        assert "SG_T" in path.read_text(), f"{path.name}: element type must come from -DSG_T"
    assert {h.name for h in HEADERS} <= included, "a header no kernel includes is never compiled"


def test_every_cuda_file_ships_in_the_wheel():
    import fnmatch
    import tomllib
    root = gpu.SOURCES.parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = data["package-data"]["shardgrad.ops"]
    for path in SOURCES + HEADERS:
        rel = path.relative_to(gpu.SOURCES.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"


def test_source_inlines_the_shared_window_header():
    header = (gpu.SOURCES / "window.cuh").read_text()
    for file in ("conv.cu", "pool.cu"):
        assert header in gpu.source(file), file
        assert "for_windows_reading(" in (gpu.SOURCES / file).read_text(), file


def test_every_launched_kernel_is_defined():
    launched = re.findall(r'run_kernel\("(\w+\.cu)", "(\w+)"', Path(gpu.__file__).read_text())
    assert len(launched) >= 12
    launched += [("optim.cu", name) for name in _flat_kernels()]
    for file, name in launched:
        assert re.search(rf'extern "C" __global__ void {name}\(', gpu.source(file)), (file, name)


def _flat_kernels() -> list[str]:
    """The optim.cu kernels the compiled GPU step's flat update (gpu_step.FlatUpdate)
    launches itself, with BLOCK threads."""
    names = re.findall(r'self\.name = "(\w+)"', Path(gpu_step.__file__).read_text())
    assert names, "gpu_step.FlatUpdate names no kernel"
    return names


def _nvcc_all(jobs) -> None:
    """``_nvcc(*job)`` for every job, in parallel; one failure message naming each that
    failed."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda j: _nvcc(*j), jobs))
    failed = [f"{cmd}\n{err}" for cmd, rc, err in results if rc != 0]
    assert not failed, "\n\n".join(failed)


@needs_nvcc
def test_every_cuda_source_compiles_for_sm90(tmp_path):
    unit = tmp_path / "fused.cu"
    unit.write_text(_generated_unit())
    units = []
    for src in SOURCES:
        units.append(tmp_path / src.name)        # what NVRTC compiles: headers inlined
        units[-1].write_text(gpu.source(src.name))
    jobs = [(src, tmp_path / f"{src.stem}_{t}.ptx", f"-DSG_T={t}")
            for src in units for t in ("float", "double")]
    jobs.append((unit, tmp_path / "fused.ptx", "-DSG_UNUSED"))
    _nvcc_all(jobs)
    for _, out, _ in jobs:
        ptx = out.read_text()
        assert ".target sm_90" in ptx and ".entry" in ptx, out.name
    fused_entries = re.findall(r"\.entry (sg_fused_\w+)", (tmp_path / "fused.ptx").read_text())
    assert len(fused_entries) == unit.read_text().count('extern "C" __global__') >= 10


def _launch_blocks() -> dict[tuple[str, str], int]:
    """(file, kernel) -> the most threads per block ops.gpu launches it with."""
    text = Path(gpu.__file__).read_text()
    calls = re.findall(r'run_kernel\("(\w+\.cu)", "(\w+)"(.{0,80})', text, re.S)
    return {**{(f, k): gpu.row_block(2**40) if "row_block(" in rest else gpu.BLOCK
               for f, k, rest in calls},
            **{("optim.cu", k): gpu.BLOCK for k in _flat_kernels()}}


@needs_nvcc
def test_every_kernel_fits_its_launch_block(tmp_path):
    blocks = _launch_blocks()
    # at 256 threads a block fits whatever ptxas does (255 registers at most): check the files
    # with larger blocks or with shared memory
    files = {f for (f, _), threads in blocks.items() if threads * 255 > 65536} | {
        f for f, _ in blocks if "__shared__" in gpu.source(f)}
    assert "softmax.cu" in files
    jobs = []
    for file in sorted(files):
        (tmp_path / file).write_text(gpu.source(file))
        jobs += [(tmp_path / file, tmp_path / f"{file}_{t}.cubin", t) for t in ("float", "double")]

    def build(job):
        src, out, t = job
        cmd = [NVCC, "-cubin", "-arch=sm_90", *CUPY_FLAGS, f"-DSG_T={t}", "--resource-usage",
               str(src), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return src.name, t, done.stdout + done.stderr

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        reports = list(pool.map(build, jobs))
    seen = set()
    for file, t, report in reports:
        for name, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry|$)",
                                     report, re.S):
            regs = int(re.search(r"Used (\d+) registers", body).group(1))
            smem = re.search(r"(\d+) bytes smem", body)
            threads = blocks.get((file, name), gpu.BLOCK)
            # registers are allocated 8 per thread at a time; an SM's 65536 bound a block
            assert -(-regs // 8) * 8 * threads <= 65536, (file, t, name, regs, threads)
            assert (int(smem.group(1)) if smem else 0) <= 48 * 1024, (file, t, name)
            seen.add((file, name))
    assert {fk for fk in blocks if fk[0] in files} <= seen


@needs_nvcc
def test_multi_tensor_kernels_compile_and_keep_their_arguments_under_4kb(tmp_path):
    """The generated multi-tensor updates (ops.gpu.multi_tensor_source) at their largest
    count compile for sm_90, and their arguments (the tensor table) fit the 4 KB that any
    CUDA version passes to a kernel."""
    jobs = []
    for kind in ("sgd", "adam"):
        src = tmp_path / f"{kind}_multi.cu"
        src.write_text(gpu.multi_tensor_source(kind, gpu.MULTI_TENSORS))
        jobs += [(src, tmp_path / f"{kind}_{t}.ptx", f"-DSG_T={t}") for t in ("float", "double")]
    _nvcc_all(jobs)
    for _, out, _ in jobs:
        ptx = out.read_text()
        entry = ptx[ptx.index("_multi("):ptx.index(")", ptx.index("_multi("))]
        sizes = [int(b) // 8 for b in re.findall(r"\.param \.[usbf](\d+)", entry)]
        assert len(sizes) > 4 * gpu.MULTI_TENSORS and sum(sizes) <= 4096, (out.name, sum(sizes))
