"""colah's "Calculus on Computational Graphs" example: e = (a + b) * (b + 1) at a=2, b=1.

Reverse mode gives every input's derivative in one backward sweep; forward mode gives the
derivative of every output along one input direction per sweep. Both must say de/da = 2 and
de/db = 5.

    python examples/colah.py
"""

import numpy as np

import shardgrad as sg
from shardgrad.graph.autodiff import grad, jvp
from shardgrad.graph.ir import Graph, leaf
from shardgrad.runtime.interpreter import run

# Eager, PyTorch style: e.backward() walks the graph in reverse (reverse mode).
a = sg.tensor(2.0, requires_grad=True, dtype="float64")
b = sg.tensor(1.0, requires_grad=True, dtype="float64")
e = (a + b) * (b + 1)
e.backward()
print(f"e = {e.item()}")
print(f"reverse mode (e.backward()):  de/da = {a.grad.item()}, de/db = {b.grad.item()}")

# The same function as a Graph, differentiated by graph transforms.
a_, b_ = leaf("input", (), "float64", name="a"), leaf("input", (), "float64", name="b")
graph = Graph({"e": (a_ + b_) * (b_ + 1.0)})
print("\nthe graph:\n" + str(graph))
feeds = {"a": np.float64(2.0), "b": np.float64(1.0)}

out = run(grad(graph, wrt=["a", "b"]), feeds)
print(f"\nreverse mode (autodiff.grad):  de/da = {out['grad/a']}, de/db = {out['grad/b']}")

forward = jvp(graph, wrt=["a", "b"])
one, zero = np.float64(1.0), np.float64(0.0)
de_da = run(forward, {**feeds, "tangent/a": one, "tangent/b": zero})["jvp/e"]
de_db = run(forward, {**feeds, "tangent/a": zero, "tangent/b": one})["jvp/e"]
print(f"forward mode (autodiff.jvp, one sweep per input):  de/da = {de_da}, de/db = {de_db}")
