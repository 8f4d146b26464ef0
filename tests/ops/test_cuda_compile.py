"""Every CUDA source compiles for the H100/H200 (``nvcc -ptx -arch=sm_90``): each hand-written
kernel file of ops/cuda for float and double, and the fused kernels generated for the groups of
the test graphs, plain and as the GPU executor builds them (views read in place; one
translation unit). Skipped only where nvcc is absent. Also checks that the
sources stay NVRTC-compatible (no #include: CuPy compiles them with NVRTC, which has no
standard headers) and that every kernel ops.gpu launches is defined.
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
from shardgrad.runtime.gpu import FusedKernel

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
SOURCES = sorted(gpu.SOURCES.glob("*.cu"))


def _nvcc(src: Path, out: Path, *flags: str) -> tuple[str, int, str]:
    cmd = [NVCC, "-ptx", "-arch=sm_90", *flags, str(src), "-o", str(out)]
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
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*#\s*include", text, re.M), (
            f"{path.name}: NVRTC has no standard headers")
        assert "SG_T" in text, f"{path.name}: element type must come from -DSG_T"


def test_every_launched_kernel_is_defined():
    launched = re.findall(r'run_kernel\("(\w+\.cu)", "(\w+)"', Path(gpu.__file__).read_text())
    assert len(launched) >= 12
    for file, name in launched:
        assert re.search(rf'extern "C" __global__ void {name}\(', gpu.source(file)), (file, name)


@needs_nvcc
def test_every_cuda_source_compiles_for_sm90(tmp_path):
    unit = tmp_path / "fused.cu"
    unit.write_text(_generated_unit())
    jobs = [(src, tmp_path / f"{src.stem}_{t}.ptx", f"-DSG_T={t}")
            for src in SOURCES for t in ("float", "double")]
    jobs.append((unit, tmp_path / "fused.ptx", "-DSG_UNUSED"))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda j: _nvcc(*j), jobs))
    failed = [f"{cmd}\n{err}" for cmd, rc, err in results if rc != 0]
    assert not failed, "\n\n".join(failed)
    for _, out, _ in jobs:
        ptx = out.read_text()
        assert ".target sm_90" in ptx and ".entry" in ptx, out.name
    fused_entries = re.findall(r"\.entry (sg_fused_\w+)", (tmp_path / "fused.ptx").read_text())
    assert len(fused_entries) == unit.read_text().count('extern "C" __global__') >= 10
