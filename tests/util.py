"""Test fixtures: a minimal PGD adversarial-training script built only from common.py's utilities."""
import time

import torch.nn.functional as F

import common

TINY = ["--dataset", "synthetic", "--arch", "wrn-10-1", "--device", "cpu", "--batch-size", "64",
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
