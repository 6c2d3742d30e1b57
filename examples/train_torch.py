"""Train a small PyTorch model on synthetic data with Chainer's NesterovAG.

    python -m pip install ".[torch]" && python examples/train_torch.py

The model, the data, the loss and the schedule are PyTorch's; only the
optimizer is cynag's: ``cynag.torch.NesterovAG`` is a ``torch.optim``
optimizer whose step is Chainer's NesterovAG (bit for bit on CPU float32 and
float64), with PyTorch's param groups, schedulers, ``state_dict`` and
``zero_grad``.  At the end the optimizer's state is saved both ways: as a
PyTorch checkpoint and as a Chainer optimizer NPZ.
"""
import argparse
import os
import tempfile

import torch

import cynag.torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    torch.manual_seed(0)
    # Synthetic regression: y = sin(x W) with noise, 2048 samples of 32 features.
    x = torch.randn(2048, 32)
    y = torch.sin(x @ torch.randn(32, 4)) + 0.05 * torch.randn(2048, 4)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 4))
    optimizer = cynag.torch.NesterovAG(model.parameters(), lr=0.05, momentum=0.9,
                                       weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), args.batch):
            idx = perm[i:i + args.batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        optimizer.new_epoch()
        print("epoch %d  loss %.4f  lr %.4f" % (epoch + 1, total / len(x),
                                                 optimizer.param_groups[0]["lr"]))
    with tempfile.TemporaryDirectory() as d:
        torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
        state = torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)
        cynag.torch.save_chainer_state(optimizer, model, os.path.join(d, "optimizer.npz"))
        print("saved: a PyTorch state_dict (%d parameter states, t=%d) and a Chainer NPZ"
              % (len(state["state"]), state["cynag"]["t"]))


if __name__ == "__main__":
    main()
