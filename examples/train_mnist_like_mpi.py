"""Data-parallel training over MPI processes with cynag.multinode (ChainerMN's API).

Launch on one machine::

    mpiexec -n 2 python examples/train_mnist_like_mpi.py

Every process builds the same model, takes its own shard of a synthetic
MNIST-like data set (784 features, 10 classes; made here, nothing is
downloaded) and trains with ``cynag.multinode.create_multi_node_optimizer``
around cynag's NesterovAG: the first ``update()`` copies rank 0's initial
parameters to every process, each later one averages the gradients over the
processes (a few packed messages) and then updates.  Rank 0 prints the
progress and the final accuracy on the test set; the parameters are the
same on every process, which the script checks at the end.
"""
import argparse
import os
import sys
import time

# One process per core: keep NumPy's BLAS (and OpenMP) to one thread each.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy  # noqa: E402

import cynag  # noqa: E402
import cynag.multinode as mn  # noqa: E402
from cynag.demo import MLP, SoftmaxCrossEntropy  # noqa: E402


def make_mnist_like(n, seed=0, n_features=784, n_classes=10):
    """Images in [0, 1] drawn around one random prototype per class; deterministic."""
    rng = numpy.random.default_rng(seed)
    protos = rng.uniform(0, 1, (n_classes, n_features)) ** 3
    labels = rng.integers(0, n_classes, size=n)
    x = protos[labels] + rng.normal(0, 2.0, (n, n_features))
    return numpy.clip(x, 0, 1).astype(numpy.float32), labels.astype(numpy.int64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=100, help="examples per process and step")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--contiguous", action="store_true",
                   help="pack the model into one buffer (gradients averaged in place)")
    p.add_argument("--communicator", default="naive", choices=mn.COMMUNICATOR_NAMES)
    args = p.parse_args(argv)

    mn.global_except_hook.add_hook()  # an exception on one rank ends the whole job
    comm = mn.create_communicator(args.communicator)
    rank, size = comm.rank, comm.size

    x, t = make_mnist_like(args.n_train + 2000, seed=0)
    x_train, t_train, x_test, t_test = (x[:args.n_train], t[:args.n_train],
                                        x[args.n_train:], t[args.n_train:])
    shard = slice(rank, None, size)             # each process its own examples
    x_mine, t_mine = x_train[shard], t_train[shard]

    model = MLP(784, args.hidden, 10, seed=rank)  # different on purpose: rank 0's wins
    optimizer = mn.create_multi_node_optimizer(
        cynag.optimizers.NesterovAG(lr=args.lr, momentum=0.9), comm)
    optimizer.setup(model, contiguous=args.contiguous)
    if rank == 0:
        print("cynag.multinode: %d processes (%d machine(s)), MLP 784-%d-10, %d examples per "
              "process, batch %d per process" % (size, comm.inter_size, args.hidden,
                                                 len(x_mine), args.batch), flush=True)

    rng = numpy.random.default_rng(1234 + rank)
    start = time.perf_counter()
    steps_per_epoch = len(x_mine) // args.batch
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_mine))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            box = []

            def lossfun(xb, tb):
                box.append(SoftmaxCrossEntropy(model, xb, tb))
                return box[-1]

            optimizer.update(lossfun, x_mine[idx], t_mine[idx])
            losses.append(box[-1].array)
        optimizer.new_epoch()
        # mean training loss over every process
        loss = comm.allreduce_obj(float(numpy.mean(losses))) / size
        test = SoftmaxCrossEntropy(model, x_test, t_test)
        if rank == 0:
            print("epoch %d  train loss %.4f  test loss %.4f  test accuracy %.3f  (%d updates, "
                  "%.1f s)" % (epoch, loss, test.array, test.accuracy, optimizer.t,
                               time.perf_counter() - start), flush=True)
    final = SoftmaxCrossEntropy(model, x_test, t_test)
    checks = comm.mpi_comm.allgather(float(sum(float(p.array.sum()) for p in model.params())))
    same = all(c == checks[0] for c in checks)
    if rank == 0:
        print("final: test accuracy %.3f, test loss %.4f; parameters identical on all %d "
              "processes: %s" % (final.accuracy, final.array, size, same), flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
