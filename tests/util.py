"""Test fixtures: a minimal PGD adversarial-training script built only from common.py's utilities."""
import contextlib
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# The device of the tiny runs: the CPU, or what ROBUST_DISTILL_TEST_DEVICE says (tests.gpu_check sets cuda for the
# test files that exercise the GPU path: tests/test_gpu_path.py, tests/test_large_models.py).
DEVICE = os.environ.get("ROBUST_DISTILL_TEST_DEVICE", "cpu")
TINY = ["--dataset", "synthetic", "--arch", "wrn-10-1", "--device", DEVICE, "--batch-size", "64",
        "--val-size", "64", "--steps", "2", "--milestones", "1"]


def pgd_at(argv):
    """Plain PGD-AT (Madry et al.) with the shared Run/Trainer plumbing; returns the best checkpoint path."""
    p = common.base_parser("tiny PGD-AT", epochs=1)
    args = p.parse_args(argv)
    run = common.Run(args, "pgd-at")
    model = run.model()
    train_model = run.prepare(model)
    opt, sched = run.optimizer(model.parameters())
    trainer = common.Trainer(run, model, opt, sched, "pgd-at")
    for epoch in trainer.epochs_to_run():
        run.train_loader.set_epoch(epoch)
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for x, y in run.train_loader:
            model.eval()
            x_adv = common.pgd(train_model, x, y, args.eps, args.alpha, args.steps)
            model.train()
            with run.autocast():
                logits = train_model(x_adv)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        trainer.end_epoch(epoch, loss_sum, correct, seen, t0)
    return trainer.finish()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return common.build_model("wrn-10-1", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)


def batch(n=8):
    (x, y), _ = common.load_dataset("synthetic", train=False)
    return x[:n].float() / 255, y[:n]


def train_small_cnn(epochs=6):
    """A small BN-free CNN trained normally (undefended) on the synthetic data; returns (net, x_test, y_test)."""
    torch.manual_seed(0)
    (x, y), _ = common.load_dataset("synthetic", train=True)
    (xt, yt), _ = common.load_dataset("synthetic", train=False)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loader = common.TensorLoader(x, y, 64, "cpu", train=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    return net.eval(), xt.float() / 255, yt


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with n torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
