"""The training run stays thin: no function of runtime/train.py (the run: building,
checkpointing, metrics and the loop) is 60 lines or longer, read from the source."""

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "runtime" / "train.py"


def test_every_function_of_the_training_run_is_under_60_lines():
    tree = ast.parse(TRAIN.read_text())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
               if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert {"train", "_train", "_build", "_epoch"} <= set(lengths)
    assert not {k: v for k, v in lengths.items() if v >= 60}, sorted(
        lengths.items(), key=lambda kv: -kv[1])[:5]
