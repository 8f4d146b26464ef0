"""runtime.dp on threaded ranks: state broadcast from rank 0, the start-up replica check, the
fault-injection knob and fail-fast, and step_options' configuration errors."""

import json
import time

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.runtime import config as cfg
from shardgrad.runtime.comm import CommError, SingleProcess
from shardgrad.runtime.dp import (
    InjectedFault,
    ReplicaMismatch,
    broadcast_state,
    check_replicas,
    fault_injector,
    step_options,
)
from shardgrad.runtime.interpreter import ExecutionError
from shardgrad.runtime.threadcomm import ThreadGroup, run_ranks

pytestmark = pytest.mark.timeout(60)


def mlp(seed, hidden=8):
    sg.manual_seed(seed)
    model = sg.nn.Sequential(sg.nn.Linear(6, hidden), sg.nn.ReLU(), sg.nn.Linear(hidden, 3))
    return model, sg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def config(**sets):
    return cfg.load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_broadcast_state_makes_every_rank_hold_rank_0s_parameters():
    pairs = [mlp(seed) for seed in range(3)]

    def body(comm):
        model, opt = pairs[comm.rank]
        broadcast_state(model, opt, comm)
        return model.state_dict()

    states = run_ranks(3, body)
    ref = mlp(0)[0].state_dict()
    for state in states:
        for k in ref:
            np.testing.assert_array_equal(state[k], ref[k])


def _prepared(comm, hidden, batch):
    model, opt = mlp(0, hidden)
    options = step_options(config(**{"parallel.dp": comm.world_size}), comm)
    step = options["make_step"](model, sg.functional.cross_entropy, opt)
    x, y = np.zeros((batch, 6), np.float32), np.zeros(batch, np.int64)
    options["prepare"](model, opt, step, x, y)
    return step(x, y)


def test_prepare_passes_when_every_rank_runs_the_same_step():
    losses = run_ranks(2, lambda comm: _prepared(comm, 8, 4))
    assert losses[0] == losses[1]


@pytest.mark.parametrize("hidden,batch,match", [
    ((8, 9), (4, 4), "rank 1's parameters differ from rank 0's"),
    ((8, 8), (4, 2), "rank 1's training-step graph differs from rank 0's"),
])
def test_prepare_names_the_rank_whose_model_or_graph_differs(hidden, batch, match):
    def body(comm):
        with pytest.raises(ReplicaMismatch, match=match):
            _prepared(comm, hidden[comm.rank], batch[comm.rank])
    run_ranks(2, body)


def test_check_replicas_compares_graph_hashes():
    graphs = []
    for batch in (4, 4, 8):
        model, opt = mlp(0)
        step = sg.compile_step(model, sg.functional.cross_entropy, opt)
        graphs.append((step.graph_for(np.zeros((batch, 6), np.float32),
                                     np.zeros(batch, np.int64))[0], model))

    def body(comm):
        check_replicas(comm, *graphs[comm.rank])
    with pytest.raises(RuntimeError, match="rank 2's training-step graph differs"):
        run_ranks(3, body)


def test_an_injected_fault_on_one_rank_fails_the_others_fast():
    def body(comm):
        model, opt = mlp(0)
        options = step_options(config(**{"parallel.dp": 2, "debug.fail_at_step": 2,
                                         "debug.fail_rank": 1}), comm)
        step = options["make_step"](model, sg.functional.cross_entropy, opt)
        for _ in range(4):
            step(np.ones((4, 6), np.float32), np.zeros(4, np.int64))

    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 1 failed: InjectedFault: injected fault at step "
                                           "2 \\(debug.fail_at_step=2, debug.fail_rank=1\\)"):
        run_ranks(2, body, timeout_s=20)
    assert time.perf_counter() - t < 10


def test_a_peer_that_fails_turns_a_blocked_collective_into_comm_error():
    def body(comm):
        if comm.rank == 1:
            raise ValueError("boom")
        model, opt = mlp(0)
        options = step_options(config(**{"parallel.dp": 2}), comm)
        step = options["make_step"](model, sg.functional.cross_entropy, opt)
        try:
            step(np.ones((4, 6), np.float32), np.zeros(4, np.int64))
        except ExecutionError as e:
            assert isinstance(e.__cause__, CommError) and "allreduce" in str(e)
            raise
    with pytest.raises(RuntimeError, match="rank 1 failed: ValueError: boom"):
        run_ranks(2, body, timeout_s=20)


def test_fault_injector_is_off_by_default_and_rank_specific():
    assert fault_injector(config(), 0) is None
    fault = fault_injector(config(**{"debug.fail_at_step": 3, "debug.fail_rank": 1}), 1)
    assert fault_injector(config(**{"debug.fail_at_step": 3, "debug.fail_rank": 1}), 0) is None
    fault(2)
    with pytest.raises(InjectedFault):
        fault(3)
    hang = config(**{"debug.fail_at_step": 3, "debug.fail_mode": "hang"})
    assert fault_injector(hang, 0, 2) is not None     # a peer's collective timeout ends it
    with pytest.raises(cfg.ConfigError, match=r"^debug.fail_mode = 'hang' in a single "
                                              r"process would hang for good"):
        fault_injector(hang, 0, 1)                     # it did: nothing ends it


@pytest.mark.parametrize("sets,match", [
    ({"parallel.dp": 3}, "parallel.dp = 3 but this job has 2 process\\(es\\): start it with "
                         "`mpirun -n 3 shardgrad train"),
    ({"parallel.dp": 2, "parallel.deterministic": True, "parallel.chunks": 3},
     "parallel.chunks = 3 must be a multiple of parallel.dp = 2"),
    ({"parallel.dp": 2, "parallel.deterministic": True, "train.batch_size": 6},
     "train.batch_size = 6 must be a multiple of parallel.chunks = 4"),
])
def test_step_options_reject_what_cannot_run(sets, match):
    comm = SingleProcess() if sets["parallel.dp"] == 1 else ThreadGroup(2).communicators()[0]
    with pytest.raises(cfg.ConfigError, match=match):
        step_options(config(**sets), comm)


def test_a_single_process_needs_no_rewrite_unless_deterministic():
    assert step_options(config(), SingleProcess())["transform"] is None
    det = step_options(config(**{"parallel.deterministic": True}), SingleProcess())["transform"]
    assert det.split == 4
