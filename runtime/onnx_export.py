"""ONNX export: the eval-mode forward graph of the IR (``trace_forward``), node for node, as
an ONNX model written with the ``onnx`` package (the [onnx] extra). Parameters and buffers
become initializers; the batch axis stays free; the input is images, vectors or (for a text
model) integer token ids. Imports graph and runtime.
"""

from __future__ import annotations

import math

import numpy as np

from shardgrad.graph.ir import Graph, Node
from shardgrad.graph.nn import Module
from shardgrad.graph.trace import trace_forward
from shardgrad.runtime.data import DataError

OPSET = 17

# The batch size the graph is traced at: no layer is this wide, so each reshape dimension
# equal to it is the batch axis and is written as -1 (any batch size).
_TRACE_BATCH = 7919

_SAME = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "matmul": "MatMul",
         "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf", "sqrt": "Sqrt",
         "exp": "Exp", "log": "Log", "neg": "Neg", "abs": "Abs", "maximum": "Max",
         "minimum": "Min", "pow": "Pow", "where": "Where", "equal": "Equal", "less": "Less",
         "less_equal": "LessOrEqual", "greater": "Greater", "greater_equal": "GreaterOrEqual"}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise DataError("export --format onnx needs the onnx package: pip install "
                        "'shardgrad[onnx]' (or pip install onnx)") from None
    return onnx


class _Writer:
    def __init__(self, onnx, dtype: str):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes, self.inits, self.names = [], [], {}
        self.dtype = dtype

    def name(self, node: Node) -> str:
        return self.names[node.id]

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def emit(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def im2col(self, node: Node, x: str, out: str) -> str:
        # (N, C, kh, kw, OH, OW) columns = a grouped convolution whose kernels pick one
        # window position each (exact: one 1.0 per output), reshaped to the IR's layout
        n, c, kh, kw, oh, ow = node.shape
        a = node.attrs
        eye = np.zeros((c * kh * kw, 1, kh, kw), node.dtype)
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    eye[(ch * kh + i) * kw + j, 0, i, j] = 1.0
        ph, pw = a["padding"]
        conv = self.emit("Conv", [x, self.init(f"{out}.picks", eye)], f"{out}.conv",
                         group=c, kernel_shape=[kh, kw], strides=list(a["stride"]),
                         pads=[ph, pw, ph, pw])
        shape = self.init(f"{out}.shape", np.asarray([-1, c, kh, kw, oh, ow], np.int64))
        return self.emit("Reshape", [conv, shape], out)

    def getitem(self, node: Node, x: str, out: str) -> str:
        # ops.shape's normalised index: one Slice over the sliced and integer-indexed axes
        # (k as k:k+1; a full slice, the batch axis's included, is left out), a Squeeze of the
        # integer axes, an Unsqueeze of the new ones
        index, shape = node.attrs["index"], node.inputs[0].shape
        cuts, drop = [], []      # (start, end, axis, step) each
        d = 0
        for it in index:
            if it[0] == "n":
                continue
            if it[0] == "i":
                cuts.append((it[1], it[1] + 1, d, 1))
                drop.append(d)
            elif it[1:] != (0, shape[d], 1):
                if shape[d] == _TRACE_BATCH:
                    raise DataError(f"export: a slice {it[1:]} of the batch axis "
                                    f"({node.where}) depends on the batch size")
                # stop None: past index 0 going down, which INT64_MIN says to Slice
                cuts.append((it[1], -2**63 if it[2] is None else it[2], d, it[3]))
            d += 1
        if cuts:
            x = self.emit("Slice", [x] + [self.init(f"{out}.{k}", np.asarray(v, np.int64))
                                          for k, v in zip(("starts", "ends", "axes", "steps"),
                                                          zip(*cuts, strict=True),
                                                          strict=True)],
                          f"{out}.slice")
        if drop:
            x = self.emit("Squeeze", [x, self.init(f"{out}.drop", np.asarray(drop, np.int64))],
                          f"{out}.squeeze")
        new = [i for i, it in enumerate([it for it in index if it[0] != "i"]) if it[0] == "n"]
        if new:
            x = self.emit("Unsqueeze", [x, self.init(f"{out}.new", np.asarray(new, np.int64))],
                          f"{out}.unsqueeze")
        return self.emit("Identity", [x], out)


def to_onnx(model: Module, input_shape: tuple[int, ...], dtype: str = "float32",
            name: str = "shardgrad", input_dtype: str | None = None):
    """The ONNX ModelProto of ``model``'s eval-mode forward for samples of ``input_shape``:
    input ``x`` (batch, *input_shape) of ``input_dtype`` (default ``dtype``; integer token
    ids for a text model), output ``logits`` of ``dtype``. Raises DataError naming an IR op
    that has no ONNX form."""
    onnx = _onnx()
    input_dtype = str(np.dtype(input_dtype or dtype))
    graph: Graph = trace_forward(model, ((_TRACE_BATCH, *input_shape), input_dtype))
    w = _Writer(onnx, dtype)
    state = {**{n: p.numpy() for n, p in model.named_parameters()},
             **{n: b.numpy() for n, b in model.named_buffers()}}
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for node in graph.nodes:
        out = f"v{node.id}"
        ins = [w.name(x) for x in node.inputs]
        a = node.attrs
        if node.op == "input":
            w.names[node.id] = "x"
            continue
        if node.op in ("param", "state"):
            w.names[node.id] = w.init(a["name"], state[a["name"]])
            continue
        if node.op == "const":
            w.names[node.id] = w.init(out, np.asarray(a["value"], node.dtype))
            continue
        if node.op in _SAME:
            w.emit(_SAME[node.op], ins, out)
        elif node.op == "transpose":
            w.emit("Transpose", ins, out, perm=list(a["axes"]))
        elif node.op == "reshape":
            dims = [-1 if d == _TRACE_BATCH else d for d in a["shape"]]
            if dims.count(-1) > 1:
                raise DataError(f"export: reshape to {a['shape']} mixes the batch axis with "
                                f"others ({node.where})")
            w.emit("Reshape", [ins[0], w.init(f"{out}.shape", np.asarray(dims, np.int64))], out)
        elif node.op in ("sum", "max") and "axis" in a:
            axis = a["axis"]
            axes = list(range(len(node.inputs[0].shape))) if axis is None else (
                [axis] if isinstance(axis, int) else list(axis))
            keep = int(bool(a.get("keepdims", False)))
            if node.op == "sum":
                w.emit("ReduceSum", [ins[0], w.init(f"{out}.axes", np.asarray(axes, np.int64))],
                       out, keepdims=keep)
            else:
                w.emit("ReduceMax", ins, out, axes=axes, keepdims=keep)
        elif node.op == "im2col":
            w.im2col(node, ins[0], out)
        elif node.op in ("max_pool2d", "avg_pool2d"):
            ph, pw = a["padding"]
            extra = {"count_include_pad": 1} if node.op == "avg_pool2d" else {}
            w.emit("MaxPool" if node.op == "max_pool2d" else "AveragePool", ins, out,
                   kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                   pads=[ph, pw, ph, pw], **extra)
        elif node.op == "gelu":      # the tanh approximation, as ops.elementwise's gelu
            x = ins[0]
            c = w.init(f"{out}.c", np.asarray(math.sqrt(2.0 / math.pi), node.dtype))
            k = w.init(f"{out}.k", np.asarray(0.044715, node.dtype))
            half = w.init(f"{out}.half", np.asarray(0.5, node.dtype))
            one = w.init(f"{out}.one", np.asarray(1.0, node.dtype))
            x3 = w.emit("Mul", [w.emit("Mul", [x, x], f"{out}.x2"), x], f"{out}.x3")
            inner = w.emit("Mul", [c, w.emit("Add", [x, w.emit("Mul", [k, x3], f"{out}.kx3")],
                                             f"{out}.sum")], f"{out}.inner")
            t = w.emit("Add", [one, w.emit("Tanh", [inner], f"{out}.tanh")], f"{out}.1pt")
            w.emit("Mul", [w.emit("Mul", [half, x], f"{out}.hx"), t], out)
        elif node.op in ("astype", "cast"):
            w.emit("Cast", ins, out,
                   to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(node.dtype)))
        elif node.op == "not_equal":
            w.emit("Not", [w.emit("Equal", ins, f"{out}.eq")], out)
        elif node.op == "embedding":      # rows of the table: a Gather along axis 0
            w.emit("Gather", ins, out, axis=0)
        elif node.op == "softmax":
            w.emit("Softmax", ins, out, axis=a["axis"])
        elif node.op == "getitem":
            w.getitem(node, ins[0], out)
        else:
            raise DataError(f"export: the IR op {node.op!r} (at {node.where}) has no ONNX form "
                            f"in runtime/onnx_export.py yet")
        w.names[node.id] = out
    logits = graph.outputs["logits"]
    w.nodes.append(onnx.helper.make_node("Identity", [w.name(logits)], ["logits"],
                                         name="logits"))
    g = onnx.helper.make_graph(
        w.nodes, name,
        [onnx.helper.make_tensor_value_info(
            "x", onnx.helper.np_dtype_to_tensor_dtype(np.dtype(input_dtype)),
            ["batch", *input_shape])],
        [onnx.helper.make_tensor_value_info("logits", elem, ["batch", logits.shape[1]])],
        w.inits)
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="shardgrad")
    proto.ir_version = min(proto.ir_version, 9)     # onnxruntime reads IR 9 since 1.17
    onnx.checker.check_model(proto)
    return proto


def export_run(run_dir: str, out: str) -> str:
    """Write ``run_dir``'s trained model as ONNX to ``out``; returns ``out``."""
    from shardgrad.runtime.inference import load_run
    from shardgrad.runtime.serialize import write_atomic

    run = load_run(run_dir)
    proto = to_onnx(run.model, run.data.input_shape, run.config.train.dtype,
                    input_dtype=str(run.data.x_train.dtype))
    data = proto.SerializeToString()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(out, write)
    return out


__all__ = ["OPSET", "export_run", "to_onnx"]
