"""Train a small network with cynag's NesterovAG: ``python -m cynag.demo``.

A two-layer perceptron (ReLU, softmax cross-entropy) with hand-written
forward and backward passes learns a deterministic synthetic data set (a
mixture of Gaussian clusters).  The training loop is the one a Chainer user
writes: ``optimizer.update(lossfun, x, t)`` clears the gradients, calls the
loss's ``backward`` and applies one fused native NesterovAG step per
parameter.  At the end the demo times the cynag update against the numpy
formulation of the same step (Chainer's four in-place numpy operations) on
the same arrays.
"""
import argparse
import sys
import time

import numpy

import cynag


class Linear(cynag.Link):
    """``y = x @ W.T + b`` with Chainer's parameter layout (W is out x in)."""

    def __init__(self, n_in, n_out, rng):
        super().__init__()
        with self.init_scope():
            scale = numpy.sqrt(2.0 / n_in)
            self.W = cynag.Parameter(
                (rng.standard_normal((n_out, n_in)) * scale).astype(numpy.float32))
            self.b = cynag.Parameter(numpy.zeros(n_out, dtype=numpy.float32))


class MLP(cynag.Chain):
    def __init__(self, n_in, n_hidden, n_out, seed=0):
        super().__init__()
        rng = numpy.random.default_rng(seed)
        with self.init_scope():
            self.l1 = Linear(n_in, n_hidden, rng)
            self.l2 = Linear(n_hidden, n_out, rng)

    def logits(self, x):
        h = numpy.maximum(x @ self.l1.W.array.T + self.l1.b.array, 0)
        return h, h @ self.l2.W.array.T + self.l2.b.array


def _accumulate(param, g):
    if param.grad is None:
        param.grad = g
    else:
        param.grad += g


class SoftmaxCrossEntropy:
    """Loss value with a hand-written ``backward``, as ``optimizer.update`` expects."""

    def __init__(self, model, x, t):
        self.model, self.x, self.t = model, x, t
        self.h, logits = model.logits(x)
        z = logits - logits.max(axis=1, keepdims=True)
        e = numpy.exp(z)
        self.p = e / e.sum(axis=1, keepdims=True)
        self.array = -numpy.log(self.p[numpy.arange(len(t)), t] + 1e-12).mean()
        self.accuracy = float((logits.argmax(axis=1) == t).mean())

    def backward(self, loss_scale=None):
        m, x, h = self.model, self.x, self.h
        d = self.p.copy()
        d[numpy.arange(len(self.t)), self.t] -= 1
        d /= len(self.t)
        if loss_scale is not None:
            d *= loss_scale
        _accumulate(m.l2.W, (d.T @ h).astype(numpy.float32))
        _accumulate(m.l2.b, d.sum(axis=0).astype(numpy.float32))
        dh = (d @ m.l2.W.array) * (h > 0)
        _accumulate(m.l1.W, (dh.T @ x).astype(numpy.float32))
        _accumulate(m.l1.b, dh.sum(axis=0).astype(numpy.float32))


def make_dataset(n, n_features, n_classes, seed=0):
    """Gaussian clusters (two per class) in ``n_features`` dimensions; deterministic."""
    rng = numpy.random.default_rng(seed)
    centers = rng.standard_normal((2 * n_classes, n_features)) * 0.6
    labels = rng.integers(0, 2 * n_classes, size=n)
    x = centers[labels] + rng.standard_normal((n, n_features))
    return x.astype(numpy.float32), (labels % n_classes).astype(numpy.int64)


def _median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(numpy.median(times))


def compare_speed(arrays, lr, momentum, repeat):
    """Median seconds of one step on ``arrays`` (list of (p, g, v)): cynag vs numpy."""
    from cynag_kernels import nesterov_ag_cpu

    def step_cynag():
        for p, g, v in arrays:
            nesterov_ag_cpu(p, g, v, lr, momentum)

    def step_numpy():
        for p, g, v in arrays:
            v *= momentum
            v -= lr * g
            p += momentum * momentum * v
            p -= (1 + momentum) * lr * g

    step_cynag(), step_numpy()  # warm up
    t_c, t_n = [], []
    for _ in range(repeat):  # interleave the two so drift hits both alike
        t_c.append(_median_time(step_cynag, 1))
        t_n.append(_median_time(step_numpy, 1))
    return float(numpy.median(t_c)), float(numpy.median(t_n))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    n_features, n_classes = 32, 10
    x, t = make_dataset(10000, n_features, n_classes, seed=args.seed)
    x_train, t_train, x_test, t_test = x[:8000], t[:8000], x[8000:], t[8000:]
    model = MLP(n_features, args.hidden, n_classes, seed=args.seed)
    optimizer = cynag.optimizers.NesterovAG(lr=args.lr, momentum=args.momentum).setup(model)
    print("cynag %s demo: MLP %d-%d-%d (%d parameters), NesterovAG(lr=%g, momentum=%g), "
          "%d threads" % (cynag.__version__, n_features, args.hidden, n_classes,
                          model.count_params(), args.lr, args.momentum,
                          cynag.get_num_threads()))
    order_rng = numpy.random.default_rng(args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = order_rng.permutation(len(x_train))
        losses, accs = [], []
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            box = []

            def lossfun(x, t):
                loss = SoftmaxCrossEntropy(model, x, t)
                box.append(loss)
                return loss

            optimizer.update(lossfun, x_train[idx], t_train[idx])
            losses.append(box[0].array)
            accs.append(box[0].accuracy)
        optimizer.new_epoch()
        test = SoftmaxCrossEntropy(model, x_test, t_test)
        print("epoch %2d  loss %.4f  train acc %.3f  test loss %.4f  test acc %.3f  "
              "(%d steps, %.1f s)" % (epoch, numpy.mean(losses), numpy.mean(accs), test.array,
                                      test.accuracy, optimizer.t, time.perf_counter() - start))
        sys.stdout.flush()
    final = SoftmaxCrossEntropy(model, x_test, t_test)
    print("final: test loss %.4f, test accuracy %.3f after %d epochs (%d steps)"
          % (final.array, final.accuracy, optimizer.epoch, optimizer.t))

    print("\nupdate speed, cynag fused kernel vs the numpy formulation on the same arrays "
          "(median, interleaved):")
    model_arrays = [(p.array, p.grad, p.update_rule.state["v"]) for p in model.params()]
    t_c, t_n = compare_speed(model_arrays, args.lr, args.momentum, repeat=200)
    print("  this model's %d parameters (%d elements): cynag %.1f us, numpy %.1f us, "
          "%.1fx" % (len(model_arrays), model.count_params(), t_c * 1e6, t_n * 1e6, t_n / t_c))
    rng = numpy.random.default_rng(1)
    n = 1 << 22
    big = [(rng.standard_normal(n).astype(numpy.float32),
            rng.standard_normal(n).astype(numpy.float32), numpy.zeros(n, numpy.float32))]
    t_c, t_n = compare_speed(big, args.lr, args.momentum, repeat=15)
    print("  one float32 array of %d elements: cynag %.2f ms (%.1f GB/s), numpy %.2f ms, "
          "%.1fx" % (n, t_c * 1e3, 20 * n / t_c / 1e9, t_n * 1e3, t_n / t_c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
