"""The compiled executor against the reference interpreter on the example models: the training
step graph of every examples/*.toml (runtime.models: the MLP with batch norm, the CNN), step by
step, bitwise; and whole training runs ending with the same parameters."""

from pathlib import Path

import numpy as np
import pytest

from shardgrad.runtime import config as cfg
from shardgrad.runtime.compiled import compile
from shardgrad.runtime.interpreter import Interpreter
from shardgrad.runtime.train import setup, train

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))
CASES = [(p, []) for p in EXAMPLES] + [
    (p, ["model.dropout=0.3"]) for p in EXAMPLES if p.stem == "digits_mlp"]


def _id(case) -> str:
    path, sets = case
    return "-".join([path.stem, *sets])


def test_there_are_example_models():
    assert {"digits_mlp", "digits_cnn"} <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_every_step_equals_the_interpreter_bitwise(case):
    """Both executors run the same step graph from the same state each step (parameters,
    optimizer state and batch-norm statistics carried by the interpreter's outputs): every
    output (loss, gradients, new state) equal bit for bit. The CNN's step has no transposes
    since im2col's layout gives NCHW directly; with one, the interpreter's ufunc results kept
    the transposed memory order (NumPy's order="K") while the Program writes C order, and
    reductions then added in another order (float32 rounding, and relative O(1) in the
    pre-batch-norm conv bias gradients, which are rounding noise around 0)."""
    path, sets = case
    config = cfg.load_config(path, sets)
    _, _, step, data = setup(config)
    n = config["train"]["batch_size"]
    graph, _ = step.graph_for(data.x_train[:n], data.y_train[:n])
    interp, program = Interpreter(graph), compile(graph)
    feeds = step.feeds(data.x_train[:n], data.y_train[:n])
    for k in range(4):
        feeds.update(x=data.x_train[k * n:(k + 1) * n], y=data.y_train[k * n:(k + 1) * n],
                     t=np.asarray(k + 1, feeds["t"].dtype), step=np.asarray(k + 1, np.int64))
        ref, out = interp.run(feeds), program.run(feeds)
        assert ref.keys() == out.keys()
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name], err_msg=f"step {k}: {name}")
        feeds.update({name.split("/", 1)[1]: np.array(v) for name, v in ref.items()
                      if name.startswith(("param/", "state/"))})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_whole_runs_end_with_the_same_parameters(path):
    summaries = [train(cfg.load_config(path, ["train.epochs=1", f"train.executor={ex}"]), None)
                 for ex in ("interpreter", "compiled")]
    assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]


def test_the_compiled_executor_is_the_default():
    assert cfg.load_config(EXAMPLES[0])["train"]["executor"] == "compiled"
    _, _, step, data = setup(cfg.load_config(EXAMPLES[0], ["train.batch_size=8"]))
    _, program = step.graph_for(data.x_train[:8], data.y_train[:8])
    assert type(program).__name__ == "Program"
