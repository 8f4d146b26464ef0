"""Pipeline schedules as data: per-stage lists of actions (F, B, SEND, RECV) for GPipe and
1F1B, printable as a grid and validated in plain Python by simulating them.

Pure: imports only the standard library. The runtime walks these lists; nothing here runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SCHEDULES = ("gpipe", "1f1b")


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or repeated action, a send without its receive,
    a dependency out of order, or a deadlock. The message names the stage and action."""


@dataclass(frozen=True)
class Transfer:
    """A value that crosses stages every micro-batch: ``name`` from stage ``src`` to ``dst``
    in the forward pass, and its gradient back from ``dst`` to ``src`` if ``grad``."""

    name: str
    src: int
    dst: int
    grad: bool = True
    nbytes: int = 0


@dataclass(frozen=True)
class Message:
    """One point-to-point transfer of one micro-batch: an activation (``kind="act"``) or a
    gradient (``"grad"``) of transfer ``name``, from stage ``src`` to ``dst``; ``tag`` is
    unique within the schedule and is the MPI tag."""

    kind: str
    name: str
    mb: int
    src: int
    dst: int
    tag: int


@dataclass(frozen=True)
class Action:
    """``F``/``B``: run the stage's forward/backward program on micro-batch ``mb``;
    ``SEND``/``RECV``: move ``msg`` (the runtime starts a send and waits for it at the end of
    the step; a receive blocks)."""

    op: str
    mb: int
    msg: Message | None = None

    def __str__(self) -> str:
        if self.op in ("F", "B"):
            return f"{self.op}{self.mb}"
        m = self.msg
        arrow = f">{m.dst}" if self.op == "SEND" else f"<{m.src}"
        return f"{'s' if self.op == 'SEND' else 'r'}{'a' if m.kind == 'act' else 'g'}{m.mb}{arrow}"


@dataclass
class Schedule:
    """Who does what, in which order: ``actions[stage]`` is that stage's list.

    Communication is ordered so that the lists are deadlock-free even when a send waits for
    its receive (rendezvous), the strictest MPI semantics. The runtime's sends are
    non-blocking (waited on at the end of the step) and its receives blocking: a weaker
    constraint, so an order that finishes with rendezvous sends finishes with those too
    (every receive is posted without waiting on a send, and completes the send it matches).
    """

    kind: str
    stages: int
    micro_batches: int
    actions: list[list[Action]]
    transfers: list[Transfer] = field(default_factory=list)

    def compute(self, stage: int) -> list[Action]:
        return [a for a in self.actions[stage] if a.op in ("F", "B")]

    def grid(self, comm: bool = False) -> str:
        """One row per stage. Without ``comm`` the compute actions sit in the time slots of
        a unit-time simulation (``.`` is idle), so the bubble is visible; with ``comm`` the
        full action list, sends (``sa0>1``) and receives (``rg0<2``) included."""
        rows = []
        if comm:
            for s, acts in enumerate(self.actions):
                rows.append(f"stage {s}: " + " ".join(str(a) for a in acts))
            return "\n".join(rows)
        slots = simulate(self, f_time=[1.0] * self.stages, b_time=[1.0] * self.stages)
        width = max(2, len(str(self.micro_batches - 1)) + 1)
        end = int(round(slots.makespan))
        for s in range(self.stages):
            cells = ["."] * end
            for a, (t0, _) in zip(self.compute(s), slots.spans[s], strict=True):
                cells[int(round(t0))] = str(a)
            rows.append(f"stage {s}: " + " ".join(c.ljust(width) for c in cells).rstrip())
        return "\n".join(rows)

    def __str__(self) -> str:
        return (f"{self.kind} schedule, {self.stages} stages, {self.micro_batches} micro-batches\n"
                + self.grid())

    def validate(self) -> None:
        validate(self)


def chain(stages: int) -> list[Transfer]:
    """The transfers of a plain pipeline: stage s sends one value to stage s+1."""
    return [Transfer(f"s{s}", s, s + 1) for s in range(stages - 1)]


def _compute_order(kind: str, stages: int, m: int) -> list[list[Action]]:
    out = []
    for s in range(stages):
        if kind == "gpipe":
            acts = [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]
        elif kind == "1f1b":
            # Warm-up: as many forwards as stages after this one, so the last stage starts its
            # first backward as soon as its first forward is done; then alternate; then drain.
            warm = min(stages - s - 1, m)
            acts = [Action("F", i) for i in range(warm)]
            for i in range(m - warm):
                acts += [Action("F", warm + i), Action("B", i)]
            acts += [Action("B", i) for i in range(m - warm, m)]
        else:
            raise ScheduleError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
        out.append(acts)
    return out


def tag(index: int, kind: str, micro_batches: int, mb: int) -> int:
    """The MPI tag of micro-batch ``mb``'s activation or gradient of transfer ``index``."""
    return (2 * index + (kind == "grad")) * micro_batches + mb


def _messages(transfers: Sequence[Transfer], m: int) -> dict[tuple[str, int, int], list[Message]]:
    """Inbound and outbound messages of each compute action: key (op, stage, mb) ->
    messages it needs ("in") or produces ("out")."""
    table: dict[tuple[str, int, int], list[Message]] = {}
    for i, t in enumerate(transfers):
        for mb in range(m):
            act = Message("act", t.name, mb, t.src, t.dst, tag(i, "act", m, mb))
            table.setdefault(("F-out", t.src, mb), []).append(act)
            table.setdefault(("F-in", t.dst, mb), []).append(act)
            if t.grad:
                g = Message("grad", t.name, mb, t.dst, t.src, tag(i, "grad", m, mb))
                table.setdefault(("B-out", t.dst, mb), []).append(g)
                table.setdefault(("B-in", t.src, mb), []).append(g)
    return table


@dataclass
class Timing:
    """Result of a timed simulation: per stage the (start, end) of each compute action."""

    spans: list[list[tuple[float, float]]]
    makespan: float

    def bubble(self) -> float:
        """Fraction of stage-time spent idle: 1 - busy / (stages * makespan)."""
        busy = sum(e - s for spans in self.spans for s, e in spans)
        return 1.0 - busy / (len(self.spans) * self.makespan) if self.makespan else 0.0


def _timed(order: list[list[Action]], table, f_time, b_time) -> list[list[tuple[float, float]]]:
    """Start/end of each compute action given compute orders, message dependencies and times
    (messages are free). Raises ScheduleError when no action can start."""
    stages = len(order)
    ready: dict[Message, float] = {}
    pos = [0] * stages
    free = [0.0] * stages
    spans: list[list[tuple[float, float]]] = [[] for _ in range(stages)]
    while any(pos[s] < len(order[s]) for s in range(stages)):
        moved = False
        for s in range(stages):
            while pos[s] < len(order[s]):
                a = order[s][pos[s]]
                needs = table.get((f"{a.op}-in", s, a.mb), [])
                if any(m not in ready for m in needs):
                    break
                start = max([free[s]] + [ready[m] for m in needs])
                end = start + (f_time[s] if a.op == "F" else b_time[s])
                spans[s].append((start, end))
                free[s] = end
                for m in table.get((f"{a.op}-out", s, a.mb), []):
                    ready[m] = end
                pos[s] += 1
                moved = True
        if not moved:
            heads = ", ".join(f"stage {s} at {order[s][pos[s]]}" for s in range(stages)
                              if pos[s] < len(order[s]))
            raise ScheduleError(f"the compute order deadlocks: {heads} wait for inputs that "
                                f"are never produced")
    return spans


def build(kind: str, stages: int, micro_batches: int,
          transfers: Sequence[Transfer] | None = None,
          f_time: Sequence[float] | None = None, b_time: Sequence[float] | None = None
          ) -> Schedule:
    """The ``kind`` ("gpipe" | "1f1b") schedule for ``stages`` stages and ``micro_batches``
    micro-batches over ``transfers`` (default: a chain). Stage s's forward and backward take
    ``f_time[s]``/``b_time[s]`` (default 1 and 2): they only decide how sends and receives
    interleave with compute.

    Communication order: the compute actions are simulated with those times; every message
    gets the key (time it is produced, a global index), and each stage performs its actions
    in key order (a receive right before the compute that needs it at the latest). Every
    link then sees its messages in the same global order from both ends, and the globally
    first pending message can always complete, so no rendezvous deadlock exists.
    """
    if stages < 1:
        raise ScheduleError(f"a pipeline needs at least 1 stage, got {stages}")
    if micro_batches < 1:
        raise ScheduleError(f"a pipeline needs at least 1 micro-batch, got {micro_batches}")
    transfers = list(chain(stages) if transfers is None else transfers)
    for t in transfers:
        if not 0 <= t.src < t.dst < stages:
            raise ScheduleError(f"transfer {t.name!r} goes from stage {t.src} to {t.dst}: "
                                f"values must flow to a later stage of {stages}")
    m = micro_batches
    order = _compute_order(kind, stages, m)
    table = _messages(transfers, m)
    spans = _timed(order, table, f_time or [1.0] * stages, b_time or [2.0] * stages)
    msg_key: dict[Message, tuple] = {}
    for s in range(stages):
        for j, (a, (_, end)) in enumerate(zip(order[s], spans[s], strict=True)):
            for k, msg in enumerate(table.get((f"{a.op}-out", s, a.mb), [])):
                msg_key[msg] = (end, 0, s, j, k)
    actions = []
    for s in range(stages):
        keyed = []
        for j, (a, (start, _)) in enumerate(zip(order[s], spans[s], strict=True)):
            keyed.append(((start, 1, s, j, 0), a))
            for msg in table.get((f"{a.op}-out", s, a.mb), []):
                keyed.append((msg_key[msg], Action("SEND", a.mb, msg)))
            for msg in table.get((f"{a.op}-in", s, a.mb), []):
                keyed.append((msg_key[msg], Action("RECV", a.mb, msg)))
        actions.append([a for _, a in sorted(keyed, key=lambda p: p[0])])
    sched = Schedule(kind, stages, m, actions, transfers)
    validate(sched)
    return sched


def simulate(schedule: Schedule, f_time: Sequence[float], b_time: Sequence[float]) -> Timing:
    """Timed run of the compute actions with free communication (the ideal pipeline)."""
    order = [schedule.compute(s) for s in range(schedule.stages)]
    spans = _timed(order, _messages(schedule.transfers, schedule.micro_batches), f_time, b_time)
    makespan = max((e for sp in spans for _, e in sp), default=0.0)
    return Timing(spans, makespan)


def ideal_bubble(stages: int, micro_batches: int) -> float:
    """GPipe's bubble fraction with equal stages: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def validate(schedule: Schedule) -> None:
    """Check, in plain Python: each stage runs F and B of every micro-batch once, F(mb) before
    B(mb); every send has exactly one matching receive; each compute comes after the receives
    it needs and before the sends of what it produces; and a step-by-step simulation where a
    send blocks until its receive is posted (rendezvous) finishes. Raises ScheduleError."""
    p, m = schedule.stages, schedule.micro_batches
    if len(schedule.actions) != p:
        raise ScheduleError(f"{len(schedule.actions)} action lists for {p} stages")
    table = _messages(schedule.transfers, m)
    sent: dict[Message, int] = {}
    received: dict[Message, int] = {}
    for s, acts in enumerate(schedule.actions):
        done: dict[tuple[str, int], int] = {}
        have: set[Message] = set()
        for i, a in enumerate(acts):
            if a.op in ("F", "B"):
                if not 0 <= a.mb < m:
                    raise ScheduleError(f"stage {s}: {a} names micro-batch {a.mb} of {m}")
                if (a.op, a.mb) in done:
                    raise ScheduleError(f"stage {s}: {a} appears twice")
                if a.op == "B" and ("F", a.mb) not in done:
                    raise ScheduleError(f"stage {s}: B{a.mb} before F{a.mb}")
                for msg in table.get((f"{a.op}-in", s, a.mb), []):
                    if msg not in have:
                        raise ScheduleError(f"stage {s}: {a} runs before receiving {msg}")
                done[(a.op, a.mb)] = i
            elif a.op == "SEND":
                if a.msg.src != s:
                    raise ScheduleError(f"stage {s}: sends a message from stage {a.msg.src}")
                producer = "F" if a.msg.kind == "act" else "B"
                if (producer, a.msg.mb) not in done:
                    raise ScheduleError(f"stage {s}: {a} before {producer}{a.msg.mb} computed it")
                sent[a.msg] = sent.get(a.msg, 0) + 1
            elif a.op == "RECV":
                if a.msg.dst != s:
                    raise ScheduleError(f"stage {s}: receives a message meant for {a.msg.dst}")
                have.add(a.msg)
                received[a.msg] = received.get(a.msg, 0) + 1
            else:
                raise ScheduleError(f"stage {s}: unknown action {a.op!r}")
        missing = [f"{op}{mb}" for op in ("F", "B") for mb in range(m) if (op, mb) not in done]
        if missing:
            raise ScheduleError(f"stage {s} never runs {' '.join(missing)}")
    expected = {msg for msgs in table.values() for msg in msgs}
    for msg in expected | set(sent) | set(received):
        if sent.get(msg, 0) != 1 or received.get(msg, 0) != 1:
            raise ScheduleError(f"{msg} is sent {sent.get(msg, 0)} and received "
                                f"{received.get(msg, 0)} times (expected once each)")
    _rendezvous(schedule)


def _rendezvous(schedule: Schedule) -> None:
    acts, p = schedule.actions, schedule.stages
    pos = [0] * p
    while True:
        moved = False
        for s in range(p):
            while pos[s] < len(acts[s]):
                a = acts[s][pos[s]]
                if a.op in ("F", "B"):
                    pos[s] += 1
                    moved = True
                    continue
                peer = a.msg.dst if a.op == "SEND" else a.msg.src
                b = acts[peer][pos[peer]] if pos[peer] < len(acts[peer]) else None
                want = "RECV" if a.op == "SEND" else "SEND"
                if b is None or b.op != want or b.msg != a.msg:
                    break
                pos[s] += 1
                pos[peer] += 1
                moved = True
        if all(pos[s] == len(acts[s]) for s in range(p)):
            return
        if not moved:
            heads = "; ".join(f"stage {s} blocked at {acts[s][pos[s]]}" for s in range(p)
                              if pos[s] < len(acts[s]))
            raise ScheduleError(f"deadlock: {heads}")
