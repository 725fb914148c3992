"""Our AA-lite cascade and Square against the official AutoAttack code on the same images (a benchmark, not a test).

    pip install pyautoattack        # or fra31/auto-attack; never a dependency of this project
    python -m tests.compare_autoattack runs/X/best.pt --n 500 [--data-dir DIR] [--device cuda] [--square-seeds 3]

Both run in float32 on the same fixed random subset evaluate.py's --n picks: evaluate.py's apgd-ce + apgd-t
cascade, and the official code with version "custom", attacks apgd-ce and apgd-t, 1 restart each, 100
iterations, min(9, classes - 1) target classes. Prints both robust accuracies, their times and the number of
images on which the two disagree.

Exact mode (the default): the official code reseeds the generator with its seed at the start of every attack
call on every batch; ours is reseeded the same way and fed the same batches (each attack on the images still
robust, batch_size at a time), so on the CPU both draw the same random starts and must agree on every image
(0 disagreements). On a GPU the official code draws its random start on the CPU and ours on the GPU: there the
comparison is statistical. --no-exact seeds ours once, as evaluate.py does.

Square (--square-seeds K, K > 0): ours and the official SquareAttack (p_init 0.8, resc_schedule=False, as
AutoAttack configures it) with --square-queries queries on the clean-correct images, K seeds each; Square is
random, so this compares how many images each breaks on average, not image by image.
"""
import argparse
import contextlib
import inspect
import time

import torch
from torch.utils.data import Subset

import common
import evaluate

NAMES = ["apgd-ce", "apgd-t"]


def official(model, x, y, eps, batch_size, n_classes, seed=0):
    AutoAttack = evaluate.official_autoattack()
    if AutoAttack is None:
        raise common.UserError("install the official package (pip install pyautoattack, or fra31/auto-attack)")
    kw = "attacks" if "attacks" in inspect.signature(AutoAttack).parameters else "attacks_to_run"
    aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", device=x.device, seed=seed, **{kw: NAMES})
    aa.apgd.n_restarts, aa.apgd_targeted.n_restarts = 1, 1
    aa.apgd_targeted.n_target_classes = min(9, n_classes - 1)
    aa.verbose = False
    run = aa.run_standard_evaluation
    out = run(x, y, **{"bs" if "bs" in inspect.signature(run).parameters else "batch_size": batch_size})
    x_adv = out[0] if isinstance(out, tuple) else out
    return robust_mask(model, x_adv, y, batch_size)


def robust_mask(model, x, y, batch_size):
    return torch.cat([evaluate.predict(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) == y


def ours(model, x, y, eps, batch_size, apgd_iters=100):
    """evaluate.py's way: the cascade per batch of images, the generator seeded once by the caller."""
    alive = []
    attack = lambda name, xa, ya: evaluate.run_attack(name, model, xa, ya, eps, eps / 4, apgd_iters=apgd_iters)
    seconds = {k: 0.0 for k in ["clean"] + NAMES}
    for i in range(0, len(x), batch_size):
        masks, _ = evaluate.cascade(model, x[i:i + batch_size], y[i:i + batch_size], NAMES, attack, eps,
                                    contextlib.nullcontext, seconds)
        alive.append(masks["apgd-t"])
    return torch.cat(alive)


def ours_exact(model, x, y, eps, batch_size, apgd_iters=100, seed=0):
    """The official code's order: each attack on all images still robust, batch_size at a time, the generator
    reseeded before every call (as the official perturb() does)."""
    alive = robust_mask(model, x, y, batch_size)
    for name in NAMES:
        idx = alive.nonzero().squeeze(1)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            torch.manual_seed(seed)
            adv = evaluate.run_attack(name, model, x[j], y[j], eps, eps / 4, apgd_iters=apgd_iters)
            alive[j[evaluate.predict(model, adv) != y[j]]] = False
    return alive


def official_square(model, x, y, eps, n_queries, seed):
    from importlib import import_module
    module = import_module(evaluate.official_autoattack().__module__.rsplit(".", 1)[0] + ".square")
    sq = module.SquareAttack(model, p_init=0.8, n_queries=n_queries, eps=eps, norm="Linf", n_restarts=1, seed=seed,
                             verbose=False, device=x.device, resc_schedule=False)
    return sq.perturb(x, y)


def compare_square(model, x, y, eps, n_queries, seeds, batch_size):
    """Images broken by ours and by the official Square, per seed, on the clean-correct images."""
    keep = robust_mask(model, x, y, batch_size)
    x, y = x[keep], y[keep]
    counts = {"ours": [], "official": []}
    for s in range(seeds):
        torch.manual_seed(s)
        adv = torch.cat([evaluate.square_attack(model, x[i:i + batch_size], y[i:i + batch_size], eps, n_queries)
                         for i in range(0, len(x), batch_size)])
        counts["ours"].append(int((~robust_mask(model, adv, y, batch_size)).sum()))
        adv = torch.cat([official_square(model, x[i:i + batch_size], y[i:i + batch_size], eps, n_queries, s)
                         for i in range(0, len(x), batch_size)])
        counts["official"].append(int((~robust_mask(model, adv, y, batch_size)).sum()))
    return len(y), counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="reseed before every attack call, as the official code does (expect 0 disagreements on a CPU)")
    p.add_argument("--square-seeds", type=int, default=0, help="also compare Square over this many seeds")
    p.add_argument("--square-queries", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model, ck = common.build_model_from_checkpoint(args.checkpoint, device)
    (xs, ys), info = common.load_dataset(ck["dataset"], args.data_dir or ck["args"].get("data_dir"), train=False)
    n_all = len(xs) if ys is not None else len(xs.samples)
    idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:args.n]  # evaluate.py's --n subset
    data = (Subset(xs, idx.tolist()), None) if ys is None else (xs[idx], ys[idx])  # folder trees stream
    batches = list(common.make_loader(data, info, args.batch_size, device))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    eps = args.eps if args.eps is not None else info.eps
    with evaluate.strict_float32():
        torch.manual_seed(0)
        t = time.time()
        a = ours_exact(model, x, y, eps, args.batch_size) if args.exact else ours(model, x, y, eps, args.batch_size)
        t_ours = time.time() - t
        t = time.time(); b = official(model, x, y, eps, args.batch_size, info.num_classes); t_official = time.time() - t
        square = (compare_square(model, x, y, eps, args.square_queries, args.square_seeds, args.batch_size)
                  if args.square_seeds > 0 else None)
    mode = "exact: reseeded per attack call" if args.exact else "seeded once"
    print(f"{args.checkpoint} ({ck['method']}, {ck['dataset']}), {len(y)} test images, eps {eps:.4f}, float32, {device}")
    print(f"  ours (evaluate.py apgd-ce + apgd-t, {mode}): robust {evaluate.format_accuracy(int(a.sum()), len(y))}  {t_ours:.0f}s")
    print(f"  official AutoAttack, same attacks:   robust {evaluate.format_accuracy(int(b.sum()), len(y))}  {t_official:.0f}s")
    print(f"  images on which they disagree: {int((a != b).sum())} (robust only for ours: {int((a & ~b).sum())}, "
          f"only for the official code: {int((~a & b).sum())})")
    if square:
        m, c = square
        mean = lambda v: sum(v) / len(v)
        print(f"  Square, {args.square_queries} queries, {args.square_seeds} seeds, on the {m} clean-correct images: "
              f"ours breaks {c['ours']} (mean {mean(c['ours']):.1f}), the official {c['official']} "
              f"(mean {mean(c['official']):.1f})")
    return a, b, square


if __name__ == "__main__":
    common.run_main(main)
