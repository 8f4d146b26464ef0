"""What the data-parallel benchmarks share: the MLP 784-512-512-10 they time (run as scripts
from bench/, so ``from common import ...`` finds this file)."""

SIZES = (784, 512, 512, 10)


def mlp(sizes=SIZES):
    """The shardgrad MLP (ReLU between Linear layers) and its SGD optimizer, seeded."""
    import shardgrad as sg

    sg.manual_seed(0)
    layers = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [sg.nn.Linear(a, b), sg.nn.ReLU()]
    model = sg.nn.Sequential(*layers[:-1])
    return model, sg.optim.SGD(model.parameters(), lr=0.01)
