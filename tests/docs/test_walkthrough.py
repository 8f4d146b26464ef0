"""docs/walkthrough.md stays true: every ``bash`` and ``python`` block runs (from a directory
holding ``examples/``), and every line of a ``text`` block that follows one appears in what
it printed."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "walkthrough.md"


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def steps(text: str) -> list[tuple[str, str, str | None]]:
    """(language, code, the text block after it or None) of each bash / python block."""
    found = blocks(text)
    out = []
    for i, (lang, body) in enumerate(found):
        if lang in ("bash", "python"):
            after = found[i + 1] if i + 1 < len(found) else ("", "")
            out.append((lang, body, after[1] if after[0] == "text" else None))
    return out


def test_the_walkthrough_has_commands_and_checked_outputs():
    found = steps(DOC.read_text())
    assert len(found) >= 6 and sum(expected is not None for *_, expected in found) >= 3
    for image in re.findall(r"\]\((walkthrough/[^)]+)\)", DOC.read_text()):
        assert (DOC.parent / image).is_file(), image


@pytest.mark.mpi
@pytest.mark.timeout(400)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_every_command_runs_and_prints_what_the_page_says(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "SHARDGRAD_PROGRESS": "0"}
    for lang, code, expected in steps(DOC.read_text()):
        if lang == "python":
            runs = [[sys.executable, "-c", code]]
        else:
            runs = [["bash", "-c", line.replace("shardgrad ", f"{sys.executable} -m shardgrad ",
                                                1) if line.startswith("shardgrad ") else line]
                    for line in code.splitlines() if line.strip() and not line.startswith("#")]
        printed = ""
        for argv in runs:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                               env=env)
            assert r.returncode == 0, f"{argv[-1]}\n{r.stderr}"
            printed += r.stdout
        for line in (expected or "").splitlines():
            assert line in printed.splitlines(), f"{line!r} not printed by:\n{code}"
    for name in ("step", "dp2", "pp2"):
        assert (tmp_path / "walk" / f"{name}.dot").read_text().startswith("digraph")
    assert (tmp_path / "walk" / "pp2" / "trace" / "all.json").is_file()
