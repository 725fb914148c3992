"""Our AA-lite cascade against the official AutoAttack code on the same images (a benchmark, not a test).

    pip install pyautoattack        # or fra31/auto-attack; never a dependency of this project
    python -m tests.compare_autoattack runs/X/best.pt --n 500 [--data-dir DIR] [--device cuda]

Both run in float32 on the same fixed random subset evaluate.py's --n picks: evaluate.py's apgd-ce + apgd-t
cascade, and the official code with version "custom", attacks apgd-ce and apgd-t, 1 restart each, 100
iterations, min(9, classes - 1) target classes. Prints both robust accuracies, their times and the number of
images on which the two disagree.
"""
import argparse
import contextlib
import inspect
import time

import torch

import common
import evaluate


def official(model, x, y, eps, batch_size, n_classes):
    AutoAttack = evaluate.official_autoattack()
    if AutoAttack is None:
        raise common.UserError("install the official package (pip install pyautoattack, or fra31/auto-attack)")
    names = ["apgd-ce", "apgd-t"]
    kw = "attacks" if "attacks" in inspect.signature(AutoAttack).parameters else "attacks_to_run"
    aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", device=x.device, seed=0, **{kw: names})
    aa.apgd.n_restarts, aa.apgd_targeted.n_restarts = 1, 1
    aa.apgd_targeted.n_target_classes = min(9, n_classes - 1)
    aa.verbose = False
    run = aa.run_standard_evaluation
    out = run(x, y, **{"bs" if "bs" in inspect.signature(run).parameters else "batch_size": batch_size})
    x_adv = out[0] if isinstance(out, tuple) else out
    return torch.cat([evaluate.predict(model, x_adv[i:i + batch_size]) for i in range(0, len(x), batch_size)]) == y


def ours(model, x, y, eps, batch_size, apgd_iters=100):
    names, alive = ["apgd-ce", "apgd-t"], []
    attack = lambda name, xa, ya: evaluate.run_attack(name, model, xa, ya, eps, eps / 4, apgd_iters=apgd_iters)
    seconds = {k: 0.0 for k in ["clean"] + names}
    for i in range(0, len(x), batch_size):
        masks, _ = evaluate.cascade(model, x[i:i + batch_size], y[i:i + batch_size], names, attack, eps,
                                    contextlib.nullcontext, seconds)
        alive.append(masks["apgd-t"])
    return torch.cat(alive)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model, ck = common.build_model_from_checkpoint(args.checkpoint, device)
    (xs, ys), info = common.load_dataset(ck["dataset"], args.data_dir or ck["args"].get("data_dir"), train=False)
    idx = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))[:args.n]  # evaluate.py's --n subset
    x, y = (xs[idx].float() / 255).to(device), ys[idx].to(device)
    eps = args.eps if args.eps is not None else info.eps
    with evaluate.strict_float32():
        torch.manual_seed(0)
        t = time.time(); a = ours(model, x, y, eps, args.batch_size); t_ours = time.time() - t
        t = time.time(); b = official(model, x, y, eps, args.batch_size, info.num_classes); t_official = time.time() - t
    print(f"{args.checkpoint} ({ck['method']}, {ck['dataset']}), {len(y)} test images, eps {eps:.4f}, float32, {device}")
    print(f"  ours (evaluate.py apgd-ce + apgd-t): robust {100 * a.float().mean():.2f}%  {t_ours:.0f}s")
    print(f"  official AutoAttack, same attacks:   robust {100 * b.float().mean():.2f}%  {t_official:.0f}s")
    print(f"  images on which they disagree: {int((a != b).sum())} (robust only for ours: {int((a & ~b).sum())}, "
          f"only for the official code: {int((~a & b).sum())})")
    return a, b


if __name__ == "__main__":
    common.run_main(main)
