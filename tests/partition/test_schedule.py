"""Pipeline schedules as data: GPipe and 1F1B action lists, their grid, and the validator
(which must accept every schedule we build and reject broken ones)."""

import dataclasses

import pytest

from shardgrad.partition.schedule import (
    SCHEDULES,
    Action,
    ScheduleError,
    Transfer,
    build,
    ideal_bubble,
    simulate,
    validate,
)

SHAPES = [(1, 1), (1, 4), (2, 1), (2, 4), (3, 2), (4, 2), (4, 4), (4, 8), (5, 3), (8, 16)]


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("p,m", SHAPES)
def test_built_schedules_validate(kind, p, m):
    s = build(kind, p, m)
    validate(s)
    for stage in range(p):
        ops = [str(a) for a in s.compute(stage)]
        assert sorted(ops) == sorted([f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)])


@pytest.mark.parametrize("p,m", SHAPES)
def test_gpipe_bubble_is_the_textbook_one(p, m):
    timing = simulate(build("gpipe", p, m), [1.0] * p, [1.0] * p)
    assert timing.bubble() == pytest.approx(ideal_bubble(p, m))


@pytest.mark.parametrize("p,m", SHAPES)
def test_1f1b_holds_at_most_p_minus_stage_micro_batches(p, m):
    def peak(s, stage):
        live = top = 0
        for a in s.compute(stage):
            live += 1 if a.op == "F" else -1
            top = max(top, live)
        return top

    for stage in range(p):
        assert peak(build("1f1b", p, m), stage) == min(p - stage, m)
        assert peak(build("gpipe", p, m), stage) == m


def test_grid_prints_the_textbook_pictures():
    assert build("gpipe", 2, 3).grid().splitlines() == [
        "stage 0: F0 F1 F2 .  .  B0 B1 B2",
        "stage 1: .  F0 F1 F2 B0 B1 B2 ."]
    assert build("1f1b", 2, 3).grid().splitlines() == [
        "stage 0: F0 F1 .  B0 F2 B1 .  B2",
        "stage 1: .  F0 B0 F1 B1 F2 B2 ."]
    comm = build("1f1b", 2, 1).grid(comm=True).splitlines()
    assert comm == ["stage 0: F0 sa0>1 rg0<1 B0", "stage 1: ra0<0 F0 B0 sg0>0"]


@pytest.mark.parametrize("kind", SCHEDULES)
def test_skip_transfers_and_fewer_micro_batches_than_stages(kind):
    # stage 0 feeds 1 and 3 directly, 1 feeds 2, 2 feeds 3; one value carries no gradient
    transfers = [Transfer("a", 0, 1), Transfer("skip", 0, 3), Transfer("b", 1, 2),
                 Transfer("c", 2, 3), Transfer("mask", 1, 3, grad=False)]
    for m in (1, 2, 3, 6):
        s = build(kind, 4, m, transfers, f_time=[1, 3, 1, 2], b_time=[2, 1, 5, 1])
        validate(s)
        sends = [a for acts in s.actions for a in acts if a.op == "SEND"]
        assert len(sends) == m * (len(transfers) * 2 - 1)


def _mutate(s, stage, fn):
    actions = [list(a) for a in s.actions]
    actions[stage] = fn(actions[stage])
    return dataclasses.replace(s, actions=actions)


def test_validator_rejects_broken_schedules():
    s = build("1f1b", 3, 4)

    def swap_first_b_before_its_f(acts):
        acts = [a for a in acts if not (a.op == "B" and a.mb == 0)]
        return [Action("B", 0)] + acts

    with pytest.raises(ScheduleError, match="B0 before F0"):
        validate(_mutate(s, 2, swap_first_b_before_its_f))
    with pytest.raises(ScheduleError, match="never runs"):
        validate(_mutate(s, 0, lambda acts: [a for a in acts if str(a) != "B3"]))
    with pytest.raises(ScheduleError, match="sent 0 and received 1"):
        validate(_mutate(s, 0, lambda acts: [a for a in acts if a.op != "SEND" or a.mb != 2]))
    with pytest.raises(ScheduleError, match="runs before receiving"):
        validate(_mutate(s, 1, lambda acts: [a for a in acts if a.op != "RECV"] +
                         [a for a in acts if a.op == "RECV"]))


def test_validator_finds_the_classic_1f1b_deadlock():
    # Stage 0 sends activation 1 before waiting for gradient 0; stage 1 sends gradient 0
    # before receiving activation 1. With blocking sends neither can move.
    s = build("1f1b", 2, 2)
    msgs = {(a.op, a.msg.kind, a.mb): a for acts in s.actions for a in acts if a.msg}
    f, b = Action("F", 0), Action("B", 0)
    f1, b1 = Action("F", 1), Action("B", 1)
    stage0 = [f, msgs["SEND", "act", 0], f1, msgs["SEND", "act", 1], msgs["RECV", "grad", 0],
              b, msgs["RECV", "grad", 1], b1]
    stage1 = [msgs["RECV", "act", 0], f, b, msgs["SEND", "grad", 0], msgs["RECV", "act", 1],
              f1, b1, msgs["SEND", "grad", 1]]
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(dataclasses.replace(s, actions=[stage0, stage1]))


def test_bad_requests():
    with pytest.raises(ScheduleError, match="at least 1 stage"):
        build("gpipe", 0, 2)
    with pytest.raises(ScheduleError, match="at least 1 micro-batch"):
        build("1f1b", 2, 0)
    with pytest.raises(ScheduleError, match="unknown schedule 'zb'"):
        build("zb", 2, 2)
    with pytest.raises(ScheduleError, match="later stage"):
        build("gpipe", 2, 2, [Transfer("back", 1, 0)])
