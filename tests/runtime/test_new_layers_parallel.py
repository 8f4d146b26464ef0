"""The new layers and tensor ops inside whole training steps: traced by compile_step, run by
the compiled executor, rewritten for data parallelism (2 threaded ranks) and split into a
2-stage pipeline; each ends with the parameters of the local reference run (float64, 1e-9
relative). Two models: a token classifier (Embedding, TransformerEncoderLayer with a padding
mask, masked mean, sort/topk/cumsum features) and an image one (grouped, depthwise and 1-d
convolutions, GroupNorm, SiLU, LeakyReLU, AdaptiveAvgPool2d), each with a different loss;
and a third of the remaining tensor methods (chunk, split, expand, repeat, gather,
masked_fill, where, abs, clip, // and %) with MultiheadAttention and Softmax modules."""

import sys
from pathlib import Path

import numpy as np
import pytest

import shardgrad as sg
from shardgrad.graph.nn import functional as F
from shardgrad.partition.data_parallel import DataParallel
from shardgrad.runtime.compiled import Program
from shardgrad.runtime.dp import bound_executor
from shardgrad.runtime.pipeline import (
    Mesh,
    PipelineProgram,
    PipelineTransform,
    gather,
    plan_pipeline,
)
from shardgrad.runtime.threadcomm import run_ranks

sys.path.insert(0, str(Path(__file__).parents[1] / "graph"))
from seeded import float64_seeded  # noqa: E402

pytestmark = pytest.mark.timeout(120)
nn = sg.nn
STEPS, BATCH, VOCAB, T, CLASSES = 3, 8, 11, 6, 3


class Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                              activation="gelu")
        self.head = nn.Linear(8 + 3, CLASSES)

    def forward(self, x):
        pad = x == 0
        h = self.enc(self.emb(x), src_key_padding_mask=pad)
        keep = (x != 0).astype(h.dtype).unsqueeze(-1)
        pooled = (h * keep).sum(1) / keep.sum(1).clip(min=1.0)
        top = pooled.topk(2, dim=1).values                     # sort / topk / cumsum / norm
        extra = sg.concat([top, pooled.sort(1)[0].cumsum(1)[:, -1:].sin()], 1)
        feats = sg.concat([pooled / pooled.norm(dim=1, keepdim=True), extra], 1)
        return self.head(feats)


class Image(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(2, 4)
        self.pool = nn.AdaptiveAvgPool2d((2, 1))
        self.c1d = nn.Conv1d(4, 4, 2, groups=2)
        self.act, self.leaky = nn.SiLU(), nn.LeakyReLU(0.1)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        h = self.act(self.c1(x))
        h = self.leaky(self.gn(self.dw(self.g(h))))
        h = self.pool(h).flatten(2)                              # (N, 4, 2)
        return self.head(self.c1d(h).flatten(1).cos())


class Mixed(nn.Module):
    """The tensor methods torch classifiers reach for, and MultiheadAttention and Softmax as
    modules of their own."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.softmax = nn.Softmax(dim=-1)
        self.head = nn.Linear(12, CLASSES)

    def forward(self, x):
        h = self.fc(x)
        a, b = h.chunk(2, dim=1)
        c, d = h.split([3, 5], dim=1)
        seq = a.unsqueeze(1).expand(-1, 3, -1) + b.unsqueeze(1).repeat(1, 3, 1).sin()
        att, _ = self.mha(seq, seq, seq)
        p = self.softmax(att.sum(1))
        idx = ((x[:, :4].abs() * 3) // 1 % 4).astype("int64")      # // and % pick columns
        g = p.gather(1, idx).masked_fill(x[:, :4] > 1.0, 0.0)
        g = g.where(x[:, 2:6] < 1.5, -g)
        return self.head(sg.concat([g, abs(c), d.clip(-1.0, 1.0)], 1))


def nll(logits, y):
    return F.nll_loss(F.log_softmax(logits, dim=1), y)


def bce(logits, y):
    """Multi-label BCE against one-hot targets made from the integer labels."""
    onehot = (y.unsqueeze(1) == sg.arange(CLASSES)).astype(logits.dtype)
    return nn.BCEWithLogitsLoss()(logits, onehot)


KINDS = {"text": (Text, F.cross_entropy), "image": (Image, bce), "text-nll": (Text, nll),
         "mixed": (Mixed, F.cross_entropy)}


def build(kind):
    with float64_seeded():
        cls, loss = KINDS[kind]
        model = cls()
        return model, loss, sg.optim.Adam(model.parameters(), lr=0.01)


def data(kind):
    rng = np.random.default_rng(3)
    y = rng.integers(0, CLASSES, STEPS * BATCH)
    if kind.startswith("text"):
        x = rng.integers(1, VOCAB, (STEPS * BATCH, T))
        x[::3, -2:] = 0                                           # padded sequences
    elif kind == "mixed":
        x = rng.normal(size=(STEPS * BATCH, 6))
    else:
        x = rng.normal(size=(STEPS * BATCH, 2, 6, 5))
    return x, y


def run(kind, executor=None, transform=None, rows=slice(None), finish=None, built=None):
    """``built``: the (model, loss, optimizer) made before the ranks' threads start (parameter
    init draws from one global generator, so threads must not build concurrently)."""
    model, loss, opt = built or build(kind)
    step = sg.compile_step(model, loss, opt, executor=executor, transform=transform)
    x, y = data(kind)
    losses = []
    for i in range(STEPS):
        xb, yb = x[i * BATCH:(i + 1) * BATCH][rows], y[i * BATCH:(i + 1) * BATCH][rows]
        losses.append(float(step(xb, yb)))
    if finish:
        finish(step)
    return {k: v.copy() for k, v in model.state_dict().items()}, losses


def eager(kind):
    """The same steps in eager mode (loss.backward(), opt.step())."""
    model, loss_fn, opt = build(kind)
    x, y = data(kind)
    for i in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(sg.tensor(x[i * BATCH:(i + 1) * BATCH])),
                       sg.tensor(y[i * BATCH:(i + 1) * BATCH]))
        loss.backward()
        opt.step()
    return {k: v.copy() for k, v in model.state_dict().items()}


def rel_err(got, want):
    assert sorted(got) == sorted(want)
    return max(float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-300))
               for k in want)


_REF: dict = {}


def reference(kind):
    if kind not in _REF:
        _REF[kind] = run(kind)
    return _REF[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_traced_step_equals_eager_steps_and_learns(kind):
    state, losses = reference(kind)
    assert rel_err(state, eager(kind)) < 1e-9
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_executor_equals_the_reference(kind):
    assert rel_err(run(kind, executor=Program)[0], reference(kind)[0]) < 1e-9


@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
def test_data_parallel_on_two_ranks_equals_the_reference(kind):
    built = [build(kind) for _ in range(2)]

    def body(comm):
        return run(kind, executor=bound_executor(None, comm), transform=DataParallel(2),
                   rows=slice(comm.rank, None, 2), built=built[comm.rank])[0]
    for got in run_ranks(2, body, timeout_s=60):
        assert rel_err(got, reference(kind)[0]) < 1e-9


@pytest.mark.parametrize("kind", ["text", "image", "mixed"])
def test_two_stage_pipeline_equals_the_reference(kind):
    built = [build(kind) for _ in range(2)]

    def body(comm):
        mesh = Mesh.of(comm, 1, 2)
        return run(kind, executor=lambda g: PipelineProgram(
                       plan_pipeline(g, mesh, 2, "1f1b", "cost", world=comm), mesh, world=comm),
                   transform=PipelineTransform(2), finish=lambda step: gather(step, mesh),
                   built=built[comm.rank])[0]
    for got in run_ranks(2, body, timeout_s=60):
        assert rel_err(got, reference(kind)[0]) < 1e-9
