"""Data-parallel training from your own script, as with Horovod or PyTorch DDP: the same file
runs alone or under mpirun; each rank reads its shard of every global batch and the ranks
average gradients (and batch-norm statistics) over MPI.

    python examples/digits_ddp.py                                   # one process
    mpirun -n 2 python examples/digits_ddp.py                       # two ranks, same result
    mpirun -n 2 python examples/digits_ddp.py --device cuda         # one GPU per rank
    mpirun -n 2 python examples/digits_ddp.py --zero 1              # ZeRO-1: 1/2 the momentum

Rank 0 prints one JSON line: the loss per epoch and the test accuracy.
"""

import argparse
import json

import shardgrad as sg
from shardgrad.runtime.data import load_digits

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--batch-size", type=int, default=32, help="global: split over the ranks")
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--dtype", default="float32")
p.add_argument("--device", default="cpu")
p.add_argument("--zero", type=int, default=0, help="1: ZeRO stage 1 (optimizer state sharded)")
args = p.parse_args()

comm = sg.distributed.init()
sg.set_default_dtype(args.dtype)
sg.manual_seed(0)
data = load_digits(args.dtype)
model = sg.nn.Sequential(sg.nn.Linear(64, 128), sg.nn.BatchNorm1d(128), sg.nn.ReLU(),
                         sg.nn.Linear(128, 10))
model.to(args.device)
opt = sg.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
step = sg.distributed.data_parallel_step(model, sg.nn.functional.cross_entropy, opt, comm,
                                         zero=args.zero)

sampler = sg.distributed.DistributedSampler(len(data.y_train), comm.world_size, comm.rank,
                                            shuffle=True, seed=0)
losses = []
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    total = n = 0
    for x, y in sg.distributed.batches(data.x_train, data.y_train, sampler, args.batch_size):
        total, n = total + step(x, y), n + 1
    losses.append(total / n)

model.eval()
acc = sg.accuracy(model, data.x_test, data.y_test)
if comm.rank == 0:
    print(json.dumps({"world_size": comm.world_size, "epoch_loss": losses,
                      "test_accuracy": acc}))
