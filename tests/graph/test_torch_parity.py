"""The tensor ops and nn layers classifier code reaches for, against torch (CPU) in float64:
forward values, and the gradient of a random projection of the output with respect to every
float input and every parameter (sg's eager autograd against torch's)."""

import numpy as np
import pytest
import torch

import shardgrad as sg
from shardgrad import nn

RTOL, ATOL = 1e-9, 1e-10


@pytest.fixture(autouse=True)
def float64():
    saved = sg.get_default_dtype()
    sg.set_default_dtype("float64")
    sg.manual_seed(0)
    yield
    sg.set_default_dtype(saved)


def _pair(arrays):
    """sg and torch leaves for each array (floats require grad)."""
    ours = [sg.tensor(a, requires_grad=a.dtype.kind == "f") if isinstance(a, np.ndarray) else a
            for a in arrays]
    theirs = [torch.tensor(a, requires_grad=a.dtype.kind == "f") if isinstance(a, np.ndarray)
              else a for a in arrays]
    return ours, theirs


def _outputs(out):
    return [o for o in (out if isinstance(out, tuple | list) else (out,)) if o is not None]


def _backward(outs, seed=1):
    rng = np.random.default_rng(seed)
    total = None
    for o in outs:
        if not np.dtype(str(o.dtype).replace("torch.", "")).kind == "f":
            continue
        u = rng.standard_normal(tuple(o.shape))
        term = (o * (sg.tensor(u) if isinstance(o, sg.Tensor) else torch.tensor(u))).sum()
        total = term if total is None else total + term
    if total is not None:
        total.backward()


def check(fn, torch_fn, *arrays, extra=(), grad=True):
    """fn(*sg tensors) against torch_fn(*torch tensors): values (all outputs) and gradients."""
    ours, theirs = _pair(arrays)
    got, want = _outputs(fn(*ours)), _outputs(torch_fn(*theirs))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert tuple(g.shape) == tuple(w.shape)
        np.testing.assert_allclose(g.numpy(), w.detach().numpy(), rtol=RTOL, atol=ATOL)
    if not grad:
        return
    _backward(got)
    _backward(want)
    for o, t in zip(list(ours) + list(extra[0:1] and extra[0]),
                    list(theirs) + list(extra[1:2] and extra[1]), strict=True):
        if isinstance(o, sg.Tensor) and o.requires_grad:
            assert (o.grad is None) == (t.grad is None)
            if o.grad is not None:
                np.testing.assert_allclose(o.grad.numpy(), t.grad.numpy(), rtol=RTOL, atol=ATOL)


def check_module(ours, theirs, *arrays, call=None):
    """A module against torch's: torch's parameters loaded into ours by name, then outputs,
    input gradients and every parameter's gradient."""
    theirs = theirs.double()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    names = [k for k, _ in ours.named_parameters()]
    assert names == [k for k, _ in theirs.named_parameters()]
    call = call or (lambda m, *xs: m(*xs))
    check(lambda *xs: call(ours, *xs), lambda *xs: call(theirs, *xs), *arrays,
          extra=([p for _, p in ours.named_parameters()],
                 [p for _, p in theirs.named_parameters()]))


rng = np.random.default_rng(0)


def X(*shape, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, shape)


def distinct(*shape):
    return rng.permutation(np.prod(shape)).reshape(shape) * 0.1 - 1.0


# ---- tensor ops -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["abs", "sin", "cos"])
def test_unary(name):
    check(lambda x: getattr(x, name)(), lambda x: getattr(x, name)(), X(3, 4))
    check(lambda x: getattr(sg, name)(x), lambda x: getattr(torch, name)(x), X(5))


def test_abs_operator():
    check(lambda x: abs(x), lambda x: abs(x), X(3, 4))


def test_where_and_masked_fill_methods():
    c = rng.random((3, 4)) < 0.5
    check(lambda x, y: x.where(sg.tensor(c), y), lambda x, y: x.where(torch.tensor(c), y),
          X(3, 4), X(4))
    check(lambda x: x.masked_fill(sg.tensor(c), -1.5),
          lambda x: x.masked_fill(torch.tensor(c), -1.5), X(3, 4))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gather(dim):
    idx = rng.integers(0, 4 if dim == 0 else 5, (4, 5) if dim == 0 else (4, 3))
    check(lambda x: x.gather(dim, sg.tensor(idx)), lambda x: x.gather(dim, torch.tensor(idx)),
          X(4, 5))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumsum(dim):
    check(lambda x: x.cumsum(dim), lambda x: x.cumsum(dim), X(3, 4, 2))


def test_cumsum_of_integers_is_int64():
    a = rng.integers(-5, 5, (6,)).astype(np.int32)
    got = sg.tensor(a).cumsum(0)
    want = torch.tensor(a).cumsum(0)
    assert got.dtype == "int64" and str(want.dtype) == "torch.int64"
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dim", [0, 1])
def test_topk(dim, largest):
    check(lambda x: x.topk(2, dim, largest), lambda x: x.topk(2, dim, largest), distinct(4, 5))
    check(lambda x: x.topk(3, dim=dim, largest=largest).values,
          lambda x: x.topk(3, dim=dim, largest=largest).values, distinct(4, 5))


@pytest.mark.parametrize("descending", [False, True])
def test_sort(descending):
    check(lambda x: x.sort(1, descending), lambda x: x.sort(1, descending), distinct(3, 6))
    check(lambda x: x.sort(0, descending=descending), lambda x: x.sort(0, descending=descending),
          distinct(4, 2))


def test_clip():
    check(lambda x: x.clip(-0.5, 0.7), lambda x: x.clip(-0.5, 0.7), X(3, 4))
    check(lambda x: x.clip(min=0.1), lambda x: x.clip(min=0.1), X(3, 4))


@pytest.mark.parametrize("p", [2, 1, float("inf"), 3])
@pytest.mark.parametrize("dim,keepdim", [(None, False), (1, False), (0, True)])
def test_norm(p, dim, keepdim):
    check(lambda x: x.norm(p, dim, keepdim), lambda x: x.norm(p, dim, keepdim),
          distinct(3, 4) + 0.05)


def test_expand_and_repeat():
    check(lambda x: x.expand(2, 3, 4), lambda x: x.expand(2, 3, 4), X(3, 1))
    check(lambda x: x.expand(-1, 5), lambda x: x.expand(-1, 5), X(3, 1))
    check(lambda x: x.repeat(2, 3), lambda x: x.repeat(2, 3), X(3, 2))
    check(lambda x: x.repeat(2, 1, 3), lambda x: x.repeat(2, 1, 3), X(3, 2))


@pytest.mark.parametrize("n,dim", [(2, 0), (3, 1), (4, 1)])
def test_chunk(n, dim):
    check(lambda x: x.chunk(n, dim), lambda x: x.chunk(n, dim), X(5, 7))


@pytest.mark.parametrize("sizes,dim", [(2, 0), (3, 1), ([1, 4, 2], 1)])
def test_split(sizes, dim):
    check(lambda x: x.split(sizes, dim), lambda x: x.split(sizes, dim), X(5, 7))


def test_tolist():
    a = X(2, 3)
    assert sg.tensor(a).tolist() == torch.tensor(a).tolist()
    assert sg.tensor(np.arange(4)).tolist() == [0, 1, 2, 3]
    assert sg.tensor(np.float64(2.5)).tolist() == 2.5


def test_floordiv_and_mod():
    y = X(3, 4, lo=0.5, hi=2.0) * np.sign(X(3, 4))
    # torch has no derivative for floor_divide: forward only (sg's is zero: piecewise constant)
    check(lambda a, b: a // b, lambda a, b: a // b, X(3, 4, lo=-5, hi=5), y, grad=False)
    # torch differentiates remainder in its first input only; the divisor's gradient,
    # -floor(x / y) g, is checked against finite differences by the op harness
    check(lambda a: a % sg.tensor(y), lambda a: a % torch.tensor(y), X(3, 4, lo=-5, hi=5))
    check(lambda a: a % 1.5, lambda a: a % 1.5, X(3, 4, lo=-5, hi=5))
    check(lambda a: 7.0 % a, lambda a: 7.0 % a, y, grad=False)
    i, j = rng.integers(-9, 9, (10,)), rng.integers(1, 4, (10,)) * rng.choice([-1, 1], 10)
    for op in (lambda a, b: a // b, lambda a, b: a % b):
        assert op(sg.tensor(i), sg.tensor(j)).tolist() == op(torch.tensor(i),
                                                            torch.tensor(j)).tolist()


# ---- layers ----------------------------------------------------------------------------------

def test_embedding():
    idx = rng.integers(0, 7, (3, 5))
    idx[0, :3] = 2                                          # repeats accumulate in the gradient
    check_module(nn.Embedding(7, 4), torch.nn.Embedding(7, 4), idx,
                 call=lambda m, i: m(sg.tensor(i) if m.__class__.__module__.startswith("shard")
                                     else torch.tensor(i)))


def test_embedding_padding_idx():
    idx = rng.integers(0, 7, (3, 5))
    idx[:, -1] = 0
    ours, theirs = nn.Embedding(7, 4, padding_idx=0), torch.nn.Embedding(7, 4, padding_idx=0)
    assert not ours.weight.numpy()[0].any()
    check_module(ours, theirs, idx,
                 call=lambda m, i: m(sg.tensor(i) if isinstance(m, nn.Module)
                                     else torch.tensor(i)))
    assert not ours.weight.grad.numpy()[0].any()


def test_embedding_out_of_range_is_one_clear_error():
    with pytest.raises(Exception, match="index 7 out of range for 7 embeddings"):
        nn.Embedding(7, 4)(sg.tensor(np.array([1, 7])))


@pytest.mark.parametrize("size", [1, (2, 3), (3, None)])
def test_adaptive_avg_pool2d(size):
    check_module(nn.AdaptiveAvgPool2d(size), torch.nn.AdaptiveAvgPool2d(size), X(2, 3, 5, 7))


@pytest.mark.parametrize("groups,cin,cout", [(2, 4, 6), (4, 4, 4), (4, 4, 8)])
def test_conv2d_groups(groups, cin, cout):
    check_module(nn.Conv2d(cin, cout, 3, padding=1, groups=groups),
                 torch.nn.Conv2d(cin, cout, 3, padding=1, groups=groups), X(2, cin, 5, 6))
    check_module(nn.Conv2d(cin, cout, (2, 3), stride=2, groups=groups, bias=False),
                 torch.nn.Conv2d(cin, cout, (2, 3), stride=2, groups=groups, bias=False),
                 X(2, cin, 5, 6))


@pytest.mark.parametrize("stride,padding,groups", [(1, 0, 1), (2, 1, 1), (1, 2, 3)])
def test_conv1d(stride, padding, groups):
    check_module(nn.Conv1d(3, 6, 3, stride, padding, groups=groups),
                 torch.nn.Conv1d(3, 6, 3, stride, padding, groups=groups), X(2, 3, 9))


def test_activations():
    check_module(nn.SiLU(), torch.nn.SiLU(), X(3, 4, lo=-4, hi=4))
    check_module(nn.LeakyReLU(), torch.nn.LeakyReLU(), X(3, 4))
    check_module(nn.LeakyReLU(0.2), torch.nn.LeakyReLU(0.2), X(3, 4))
    check_module(nn.Softmax(dim=1), torch.nn.Softmax(dim=1), X(3, 4, 2))
    check_module(nn.Softmax(dim=-1), torch.nn.Softmax(dim=-1), X(3, 4))


@pytest.mark.parametrize("groups,shape", [(2, (3, 4, 5, 2)), (1, (2, 6, 3)), (6, (2, 6, 4))])
def test_group_norm(groups, shape):
    theirs = torch.nn.GroupNorm(groups, shape[1])
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    check_module(nn.GroupNorm(groups, shape[1]), theirs, X(*shape))
    check_module(nn.GroupNorm(groups, shape[1], affine=False),
                 torch.nn.GroupNorm(groups, shape[1], affine=False), X(*shape))


def _labels(m, y):
    return sg.tensor(y) if isinstance(m, nn.Module) else torch.tensor(y)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss(reduction):
    y = rng.integers(0, 5, (4,))
    check_module(nn.NLLLoss(reduction=reduction), torch.nn.NLLLoss(reduction=reduction),
                 np.log(rng.dirichlet(np.ones(5), 4)), call=lambda m, x: m(x, _labels(m, y)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6,), (4, 3)])              # binary, multi-label
def test_bce_with_logits(shape, reduction):
    y = (rng.random(shape) < 0.5).astype(np.float64)
    check_module(nn.BCEWithLogitsLoss(reduction=reduction),
                 torch.nn.BCEWithLogitsLoss(reduction=reduction), X(*shape, lo=-30, hi=30),
                 call=lambda m, x: m(x, _labels(m, y)))


def test_bce_with_logits_weights_and_soft_targets():
    y, w, pw = rng.random((4, 3)), rng.random(3) + 0.5, np.array([0.5, 2.0, 3.0])
    check_module(nn.BCEWithLogitsLoss(weight=w, pos_weight=pw),
                 torch.nn.BCEWithLogitsLoss(weight=torch.tensor(w), pos_weight=torch.tensor(pw)),
                 X(4, 3), call=lambda m, x: m(x, _labels(m, y)))


def _mask(m, a):
    return None if a is None else (sg.tensor(a) if isinstance(m, nn.Module) else torch.tensor(a))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "attn-bool", "attn-float", "both"])
def test_multihead_attention(batch_first, masks):
    n, lq, s, e = 2, 4, 5, 8
    pad = np.zeros((n, s), bool)
    pad[0, -2:] = True
    attn = rng.random((lq, s)) < 0.3
    attn[:, 0] = False
    kpm = pad if masks in ("padding", "both") else None
    am = {"attn-bool": attn, "both": attn, "attn-float": X(lq, s)}.get(masks)
    shape = (lambda l: (n, l, e)) if batch_first else (lambda l: (l, n, e))
    theirs = torch.nn.MultiheadAttention(e, 2, batch_first=batch_first)
    with torch.no_grad():
        theirs.in_proj_bias.uniform_(-0.3, 0.3)
        theirs.out_proj.bias.uniform_(-0.3, 0.3)
    check_module(nn.MultiheadAttention(e, 2, batch_first=batch_first), theirs,
                 X(*shape(lq)), X(*shape(s)), X(*shape(s)),
                 call=lambda m, q, k, v: m(q, k, v, key_padding_mask=_mask(m, kpm),
                                           attn_mask=_mask(m, am)))


def test_multihead_attention_per_head_weights():
    theirs = torch.nn.MultiheadAttention(6, 3, batch_first=True)
    check_module(nn.MultiheadAttention(6, 3, batch_first=True), theirs, X(2, 3, 6),
                 call=lambda m, x: m(x, x, x, average_attn_weights=False))


@pytest.mark.parametrize("activation,norm_first,batch_first",
                         [("relu", False, True), ("gelu", True, True), ("relu", False, False)])
def test_transformer_encoder_layer(activation, norm_first, batch_first):
    pad = np.zeros((2, 5), bool)
    pad[1, 3:] = True
    theirs = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation,
                                              batch_first=batch_first, norm_first=norm_first)
    theirs.eval()         # no dropout; torch's eval fast path is off for float64 / grads
    x = X(2, 5, 8) if batch_first else X(5, 2, 8)
    check_module(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation,
                                            batch_first=batch_first, norm_first=norm_first),
                 theirs, x, call=lambda m, x: m(x, src_key_padding_mask=_mask(m, pad)))


def test_transformer_encoder_layer_causal_mask():
    theirs = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    causal = np.triu(np.ones((5, 5), bool), 1)
    check_module(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), theirs,
                 X(2, 5, 8), call=lambda m, x: m(x, src_mask=_mask(m, causal)))


# ---- bad input: one clear error naming what is wrong ------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: sg.tensor(X(3, 4)).topk(5, 1), "k=5 out of range"),
    (lambda: sg.tensor(X(3, 4)).split([1, 2], 1), "must sum to 4"),
    (lambda: sg.tensor(X(3, 4)).expand(3, 5), "cannot expand"),
    (lambda: sg.tensor(X(3, 4)).repeat(2), "at least 2 sizes"),
    (lambda: sg.tensor(X(3, 4)).chunk(0), "chunks must be positive"),
    (lambda: sg.tensor(X(3, 4)).norm(-1), "p must be positive"),
    (lambda: nn.Conv2d(4, 6, 3, groups=4), "must divide"),
    (lambda: nn.Conv2d(4, 4, 3, groups=2)(sg.tensor(X(1, 3, 5, 5))), "groups"),
    (lambda: nn.GroupNorm(4, 6), "must divide"),
    (lambda: nn.GroupNorm(2, 4)(sg.tensor(X(2, 3, 5))), "expected 4 channels"),
    (lambda: nn.Embedding(5, 2)(sg.tensor(X(3))), "indices must be integers"),
    (lambda: nn.MultiheadAttention(6, 4), "must divide"),
    (lambda: nn.MultiheadAttention(4, 2)(*[sg.tensor(X(3, 2, 4))] * 3,
                                         key_padding_mask=sg.tensor(np.zeros((3, 3), bool))),
     "key_padding_mask of shape"),
    (lambda: nn.BCEWithLogitsLoss()(sg.tensor(X(3, 2)), sg.tensor(X(3))), "must have the input"),
    (lambda: nn.TransformerEncoderLayer(4, 2, activation="tanh"), "activation must be"),
])
def test_bad_input_is_one_clear_error(make, message):
    with pytest.raises((ValueError, TypeError, IndexError), match=message):
        make()
