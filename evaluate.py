"""evaluate.py: one strong, honest robustness evaluation for every robust-distill checkpoint.

    python evaluate.py runs/ltd-cifar10-wrn-34-10/best.pt --preset standard      # "AA-lite" on the full test set
    python evaluate.py CKPT --preset quick --diagnose --examples grid.png        # PGD-20 + CW, masking checks
    python evaluate.py CKPT --attacks fgsm,pgd100 --n 2000 --eps 0.0157
    python evaluate.py CKPT --transfer-from runs/other/best.pt                   # gray/black-box transfer

Threat model L-infinity; eps 8/255 (CIFAR/SVHN), 0.3 (MNIST), 4/255 (large folders) unless --eps.
Attacks (written here from their papers, no extra dependency):
  fgsm, pgd20, pgd100 (CE, random start), cw (PGD-20 on the logit margin, "CW-inf"),
  apgd-ce, apgd-t (Croce & Hein 2020: APGD with momentum 0.75, step halving at checkpoints, 100 iterations;
  APGD-T = targeted DLR against the 9 next most likely classes), square (Andriushchenko et al. 2020,
  score-based black-box, 5,000 queries), transfer (PGD-20 crafted on --transfer-from), and autoattack
  (the official package, only if it happens to be installed).
Presets: quick = pgd20 + cw on 1,000 images; standard = apgd-ce + apgd-t ("AA-lite": AutoAttack without
FAB-T and Square) on the full test set; full = standard + square.
Like AutoAttack, each attack runs only on the images that are still robust, and robust accuracy is the
per-image worst case over all attacks run. --diagnose adds the gradient-masking checks of Carlini et al.
2019 ("On Evaluating Adversarial Robustness") and prints a verdict.
"""
import argparse
import inspect
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import common

PRESETS = {"quick": ["pgd20", "cw"], "standard": ["apgd-ce", "apgd-t"], "full": ["apgd-ce", "apgd-t", "square"]}
ATTACKS = ("fgsm", "pgd20", "pgd100", "cw", "apgd-ce", "apgd-t", "square", "transfer", "autoattack")


# ----------------------------------------------------------------------------------------- APGD
def apgd(model, x, y, eps, n_iter=100, loss="ce", target=None, rho=0.75):
    """APGD (Croce & Hein 2020) for L-inf. loss: 'ce', 'dlr' or 'dlr-t' (targeted, needs `target`).

    Returns the first misclassified iterate for broken points, else the highest-loss point.
    """
    def loss_and_grad(z):
        z = z.clone().requires_grad_(True)
        logits = model(z).float()
        value = (F.cross_entropy(logits, y, reduction="none") if loss == "ce" else common.dlr_loss(logits, y)
                 if loss == "dlr" else common.dlr_targeted_loss(logits, y, target))
        grad, = torch.autograd.grad(value.sum(), z)
        return value.detach(), grad.detach(), logits.argmax(1) != y

    project = lambda z: torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1)
    t = torch.rand_like(x) * 2 - 1
    x_cur = project(x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1))
    value, grad, wrong = loss_and_grad(x_cur)
    x_out = torch.where(wrong.view(-1, 1, 1, 1), x_cur, x)
    broken = wrong.clone()
    x_best, g_best, best = x_cur.clone(), grad.clone(), value.clone()
    step = torch.full((len(x), 1, 1, 1), 2.0 * eps, device=x.device)
    x_prev, v_prev = x_cur.clone(), value
    # Checkpoints: first after 22% of the iterations, then intervals shrinking by 3% down to 6%.
    k, checks, it = max(int(0.22 * n_iter), 1), [], 0
    while it + k <= n_iter:
        it += k
        checks.append((it, k))
        k = max(k - max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1))
    ups = torch.zeros(len(x), device=x.device)
    halved_last = torch.ones(len(x), dtype=torch.bool, device=x.device)  # so C2 cannot fire at the first check
    best_at_check = best.clone()
    for i in range(n_iter):
        z = project(x_cur + step * grad.sign())
        a = 1.0 if i == 0 else 0.75  # momentum, as in the paper
        x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
        x_prev, x_cur = x_cur, x_new
        value, grad, wrong = loss_and_grad(x_cur)
        newly = wrong & ~broken
        x_out[newly], broken = x_cur[newly], broken | wrong
        ups += (value > v_prev).float()
        v_prev = value
        better = value > best
        x_best[better], g_best[better], best[better] = x_cur[better], grad[better], value[better]
        if checks and i + 1 == checks[0][0]:
            _, k = checks.pop(0)
            oscillating = ups <= rho * k                       # C1: the loss rarely went up
            stalled = ~halved_last & (best <= best_at_check)   # C2: no progress since the last check
            halve = oscillating | stalled
            step[halve] /= 2
            x_cur[halve], grad[halve] = x_best[halve], g_best[halve]  # restart from the best point
            halved_last, best_at_check, ups = halve, best.clone(), torch.zeros_like(ups)
    return torch.where(broken.view(-1, 1, 1, 1), x_out, x_best)


def apgd_targeted(model, x, y, eps, n_iter=100, n_targets=9):
    """APGD-T: one targeted-DLR run per target class, ranked 2nd..(n_targets+1)th by the clean logits."""
    with torch.no_grad():  # rank the other classes; the true class first whatever its logit
        order = model(x).float().scatter(1, y[:, None], float("inf")).argsort(1, descending=True)
    x_adv, alive = x.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
    for r in range(1, min(n_targets, order.shape[1] - 1) + 1):
        idx = alive.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        adv = apgd(model, x[idx], y[idx], eps, n_iter, "dlr-t", target=order[idx, r])
        with torch.no_grad():
            hit = model(adv).argmax(1) != y[idx]
        x_adv[idx[hit]], alive[idx[hit]] = adv[hit], False
    return x_adv


# --------------------------------------------------------------------------------------- Square
def square_attack(model, x, y, eps, n_queries=5000, p_init=0.8):
    """Square attack, L-inf (Andriushchenko et al. 2020): random square updates of +-eps, kept when the
    margin z_y - max_{i!=y} z_i decreases; the square's area shrinks on a fixed schedule. Queries only."""
    def margin(z, labels):
        with torch.no_grad():
            return -common.cw_margin_loss(model(z).float(), labels)
    b, c, h, w = x.shape
    x_adv = (x + eps * torch.randint(0, 2, (b, c, 1, w), device=x.device).float().mul(2).sub(1)).clamp(0, 1)
    m = margin(x_adv, y)
    for i in range(n_queries - 1):
        todo = (m > 0).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        j = int(i * 10000 / n_queries)  # the paper's schedule is written for 10,000 queries
        p = p_init / 2 ** sum(j > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
        s = max(min(int(round(math.sqrt(p * h * w))), h - 1, w - 1), 1)
        n = len(todo)
        r0 = torch.randint(0, h - s + 1, (n, 1, 1, 1), device=x.device)
        c0 = torch.randint(0, w - s + 1, (n, 1, 1, 1), device=x.device)
        rows, cols = torch.arange(h, device=x.device).view(1, 1, h, 1), torch.arange(w, device=x.device).view(1, 1, 1, w)
        window = (rows >= r0) & (rows < r0 + s) & (cols >= c0) & (cols < c0 + s)
        signs = torch.randint(0, 2, (n, c, 1, 1), device=x.device).float().mul(2).sub(1)
        xs = x[todo]
        cand = torch.where(window, (xs + eps * signs).clamp(0, 1), x_adv[todo])
        m_new = margin(cand, y[todo])
        keep = m_new < m[todo]
        x_adv[todo[keep]], m[todo[keep]] = cand[keep], m_new[keep]
    return x_adv


# ------------------------------------------------------------------------------------ The cascade
def run_attack(name, model, x, y, eps, alpha, source=None, apgd_iters=100, square_queries=5000):
    """Adversarial examples for one attack on a batch of (still robust) images."""
    if name == "fgsm":
        return common.pgd(model, x, y, eps, eps, 1, random_start=False)
    if name in ("pgd20", "pgd100"):
        return common.pgd(model, x, y, eps, alpha, int(name[3:]))
    if name == "cw":
        return common.pgd(model, x, y, eps, alpha, 20, loss="cw")
    if name == "apgd-ce":
        return apgd(model, x, y, eps, apgd_iters, "ce")
    if name == "apgd-t":
        return apgd_targeted(model, x, y, eps, apgd_iters) if predict_logits(model, x[:1]).shape[1] >= 4 else x
    if name == "square":
        return square_attack(model, x, y, eps, square_queries)
    if name == "transfer":
        return common.pgd(source, x, y, eps, alpha, 20)
    if name == "autoattack":
        AutoAttack = official_autoattack()
        aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=x.device)  # both packages' API
        run = aa.run_standard_evaluation  # the batch-size keyword differs between the two packages
        out = run(x, y, **{"bs" if "bs" in inspect.signature(run).parameters else "batch_size": len(x)})
        return out[0] if isinstance(out, tuple) else out  # the PyPI copy also returns the predicted labels
    raise common.UserError(f"unknown attack '{name}' (choose from {', '.join(ATTACKS)})")


def official_autoattack():
    """The official AutoAttack class if installed (optional, only to compare with), else None."""
    for module in ("autoattack", "pyautoattack"):
        try:
            return __import__(module).AutoAttack
        except ImportError:
            pass
    return None


def cascade(model, x, y, names, attack, eps, autocast, seconds):
    """Run the attacks one after another, each only on the images still robust (as AutoAttack does).

    Returns ({"clean"/name: bool mask of images still robust after it}, the adversarial images found) and
    adds each attack's time to `seconds`. An image broken by any attack stays broken: worst case per image.
    """
    sync(x.device); t = time.time()
    with autocast():
        alive = predict(model, x) == y
    sync(x.device); seconds["clean"] += time.time() - t
    masks, x_show = {"clean": alive.clone()}, x.clone()
    for name in names:
        idx = alive.nonzero().squeeze(1)
        sync(x.device); t = time.time()
        if len(idx):
            with autocast():
                adv = attack(name, x[idx], y[idx])
                hit = predict(model, adv) != y[idx]
            if (adv - x[idx]).abs().max() > eps + 1e-5:
                raise RuntimeError(f"attack {name} left the eps ball")
            alive[idx[hit]] = False
            x_show[idx[hit]] = adv[hit]
        sync(x.device); seconds[name] += time.time() - t
        masks[name] = alive.clone()
    return masks, x_show


def predict_logits(model, x):
    """Logits in float32 even inside autocast: deciding correct vs broken must not depend on bf16 rounding."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return model(x).float()


def predict(model, x):
    return predict_logits(model, x).argmax(1)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------- Diagnostics
def diagnose(model, x, y, eps, alpha, num_classes, autocast, square_queries=1000):
    """Gradient-masking checks (Carlini et al. 2019, section 5 of our defensive-distillation notes)."""
    d, reasons = {}, []
    with torch.no_grad():
        z = model(x).float()  # diagnostics in float32: saturation is a numerical effect
    top2 = z.topk(2, 1).values
    d["mean_abs_logit"] = z.abs().mean().item()
    d["mean_top2_margin"] = (top2[:, 0] - top2[:, 1]).mean().item()
    d["saturated_softmax_share"] = (F.softmax(z, 1).amax(1) == 1.0).float().mean().item()
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xg).float(), y, reduction="sum"), xg)
    d["zero_grad_share"] = (g.flatten(1).abs().amax(1) == 0).float().mean().item()
    acc = lambda xa: (predict(model, xa) == y).float().mean().item()
    with autocast():
        d["acc_clean"] = acc(x)
        d["acc_fgsm"] = acc(common.pgd(model, x, y, eps, eps, 1, random_start=False))
        d["acc_pgd20_ce"] = acc(common.pgd(model, x, y, eps, alpha, 20))
        d["acc_pgd100_ce"] = acc(common.pgd(model, x, y, eps, alpha, 100))
        d["acc_pgd20_cw"] = acc(common.pgd(model, x, y, eps, alpha, 20, loss="cw"))
        d["acc_square"] = acc(square_attack(model, x, y, eps, n_queries=square_queries))
        sweep = sorted({min(eps * f, 0.5) for f in (1, 2, 4)} | {0.5})
        d["eps_sweep"] = {f"{e:.4f}": acc(common.pgd(model, x, y, e, e / 4, 20, loss="cw")) for e in sweep}
    white = min(d["acc_pgd20_ce"], d["acc_pgd100_ce"], d["acc_pgd20_cw"])
    gap = d["acc_pgd20_ce"] - d["acc_pgd20_cw"]
    if gap > 0.10:
        reasons.append(f"CE-vs-margin gap: PGD-20 on cross-entropy leaves {100 * d['acc_pgd20_ce']:.1f}% but on the "
                       f"logit margin {100 * d['acc_pgd20_cw']:.1f}% (the CE gradient is uninformative)")
    if d["zero_grad_share"] > 0.10:
        reasons.append(f"{100 * d['zero_grad_share']:.0f}% of images have an exactly zero input gradient of the CE loss")
    if d["saturated_softmax_share"] > 0.5 and d["mean_abs_logit"] > 50:
        reasons.append(f"saturated softmax: mean |logit| {d['mean_abs_logit']:.0f}, max probability exactly 1 for "
                       f"{100 * d['saturated_softmax_share']:.0f}% of images")
    if d["acc_fgsm"] < d["acc_pgd20_ce"] - 0.03:
        reasons.append("single-step FGSM beats iterative PGD-20")
    if d["acc_pgd100_ce"] > d["acc_pgd20_ce"] + 0.03:
        reasons.append("more PGD steps helped the defence")
    if d["acc_square"] < white - 0.03:
        reasons.append(f"black-box Square ({100 * d['acc_square']:.1f}%) beats the white-box attacks ({100 * white:.1f}%)")
    accs = list(d["eps_sweep"].values())
    if accs[-1] > max(0.05, 1.5 / num_classes):
        reasons.append(f"accuracy does not reach ~0 as eps grows ({100 * accs[-1]:.1f}% at eps 0.5)")
    if any(b > a + 0.05 for a, b in zip(accs, accs[1:])):
        reasons.append("accuracy rises with a larger eps")
    d["reasons"], d["masking_suspected"] = reasons, bool(reasons)
    d["verdict"] = ("gradient masking suspected: " + "; ".join(reasons)) if reasons else "no sign of gradient masking"
    return d


# ---------------------------------------------------------------------------------------- Output
def save_grid(path, x, x_adv, y, pred, classes, k=8):
    """PNG: clean images on top, their adversarial versions below, each captioned label / prediction."""
    from PIL import Image, ImageDraw
    k, cell = min(k, len(x)), 96
    img = Image.new("RGB", (k * cell, 2 * (cell + 14)), "white")
    draw = ImageDraw.Draw(img)
    for row, (imgs, caps) in enumerate(((x, y), (x_adv, pred))):
        for i in range(k):
            t = (imgs[i].float().cpu().clamp(0, 1) * 255).byte()
            t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
            tile = Image.fromarray(t.permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            img.paste(tile, (i * cell, row * (cell + 14) + 14))
            draw.text((i * cell + 2, row * (cell + 14)), ("" if row == 0 else "adv: ") + classes[int(caps[i])][:12], fill="black")
    img.save(path)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--attacks", default=None, help=f"comma list overriding the preset, from {', '.join(ATTACKS)}")
    p.add_argument("--n", type=int, default=None, help="N test images, a fixed random subset (default: 1,000 for quick, else all)")
    p.add_argument("--eps", type=float, default=None, help="default: the dataset's threat model")
    p.add_argument("--alpha", type=float, default=None, help="PGD step (default eps/4)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--apgd-iters", type=int, default=100, help="APGD iterations (AutoAttack: 100)")
    p.add_argument("--square-queries", type=int, default=5000, help="Square queries (AutoAttack: 5,000)")
    p.add_argument("--transfer-from", default=None, help="source checkpoint for the transfer attack")
    p.add_argument("--diagnose", action="store_true", help="run the gradient-masking checks")
    p.add_argument("--diagnose-n", type=int, default=500, help="images used by the diagnostics")
    p.add_argument("--json", default=None, help="report path (default: <checkpoint>.eval.json)")
    p.add_argument("--examples", default=None, help="write a PNG grid of clean vs adversarial images")
    p.add_argument("--dataset", default=None, help="override the checkpoint's dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-amp", action="store_true", help="attack in float32 instead of bf16 autocast (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model, ck = common.build_model_from_checkpoint(args.checkpoint, device)
    dataset = args.dataset or ck["dataset"]
    data_dir = args.data_dir or ck["args"].get("data_dir", "./data")
    (xs, ys), info = common.load_dataset(dataset, data_dir, train=False)
    if (info.num_classes, info.channels, info.size) != (ck["num_classes"], ck.get("in_channels", 3), ck.get("image_size", 32)):
        raise common.UserError(f"dataset mismatch: checkpoint expects {ck['num_classes']} classes of "
                               f"{ck.get('in_channels', 3)}x{ck.get('image_size', 32)}px ({ck['dataset']}), but "
                               f"'{dataset}' has {info.num_classes} classes of {info.channels}x{info.size}px")
    names = list(dict.fromkeys(args.attacks.split(","))) if args.attacks else PRESETS[args.preset]  # no repeats
    for name in names:
        if name not in ATTACKS:
            raise common.UserError(f"unknown attack '{name}' (choose from {', '.join(ATTACKS)})")
    if "autoattack" in names and official_autoattack() is None:
        raise common.UserError("--attacks autoattack needs the official package installed: fra31/auto-attack "
                               "(imports as autoattack) or its PyPI copy pyautoattack")
    source = None
    if "transfer" in names or args.transfer_from:
        if not args.transfer_from:
            raise common.UserError("the transfer attack needs --transfer-from OTHER.pt")
        source, sck = common.build_model_from_checkpoint(args.transfer_from, device)
        if sck["num_classes"] != ck["num_classes"] or sck["dataset"] != ck["dataset"]:
            raise common.UserError(f"--transfer-from was trained on {sck['dataset']}, the target on {ck['dataset']}")
        names = names + ["transfer"] if "transfer" not in names else names
    eps = args.eps if args.eps is not None else info.eps
    alpha = args.alpha if args.alpha is not None else eps / 4  # 2/255 at 8/255; 0.075 on MNIST (0.3)
    n_all = len(xs) if ys is not None else len(xs.samples)
    n = min(args.n or (1000 if args.preset == "quick" and not args.attacks else n_all), n_all)
    # A fixed random subset, not the first n: folder trees are stored class by class.
    idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:n] if n < n_all else torch.arange(n_all)
    if ys is None:
        from torch.utils.data import Subset
        data = (Subset(xs, idx.tolist()), None)
    else:
        data = (xs[idx], ys[idx])
    loader = common.make_loader(data, info, args.batch_size, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and not args.no_amp \
        else (lambda: torch.autocast("cpu", enabled=False))

    correct, robust_after = 0, {k: 0 for k in names}
    seconds = {k: 0.0 for k in ["clean"] + names}
    grid, diag_x, diag_y = None, [], []
    attack = lambda name, xa, ya: run_attack(name, model, xa, ya, eps, alpha, source, args.apgd_iters, args.square_queries)
    for x, y in loader:
        alive, x_show = cascade(model, x, y, names, attack, eps, autocast, seconds)
        correct += alive["clean"].sum().item()
        for name in names:
            robust_after[name] += alive[name].sum().item()
        if grid is None:
            grid = (x, x_show, y, predict(model, x_show))
        if args.diagnose and sum(len(v) for v in diag_y) < args.diagnose_n:
            diag_x.append(x), diag_y.append(y)

    report = {"checkpoint": os.path.abspath(args.checkpoint), "method": ck["method"], "arch": ck["arch"],
              "dataset": dataset, "temperature": model.temperature, "epoch": ck["epoch"] + 1, "train_metrics": ck["metrics"],
              "n": n, "eps": eps, "alpha": alpha, "attack_settings": {"pgd_step": alpha, "apgd_iters": args.apgd_iters,
              "apgd_t_targets": 9, "square_queries": args.square_queries, "transfer_from": args.transfer_from, "amp": "bf16" if
              device.type == "cuda" and not args.no_amp else "fp32"}, "device": str(device),
              "clean_acc": correct / n, "attacks": [{"name": k, "acc_after": robust_after[k] / n, "seconds": seconds[k]} for k in names],
              "robust_acc": (robust_after[names[-1]] if names else correct) / n, "seconds": seconds}
    print(f"{args.checkpoint}: method {ck['method']}, arch {ck['arch']}, {dataset}, deployed temperature {model.temperature:g}")
    print(f"L-inf eps {eps:.4f} ({eps * 255:.1f}/255), {n} test images, attacks: {', '.join(names)}")
    print(f"  {'clean':<12}{100 * report['clean_acc']:7.2f}%  {seconds['clean']:8.1f}s")
    for a in report["attacks"]:
        print(f"  {'after ' + a['name']:<12}{100 * a['acc_after']:7.2f}%  {a['seconds']:8.1f}s")
    print(f"robust accuracy (per-image worst case over {len(names)} attacks): {100 * report['robust_acc']:.2f}%")
    if args.diagnose:
        x, y = torch.cat(diag_x)[:args.diagnose_n], torch.cat(diag_y)[:args.diagnose_n]
        report["diagnostics"] = diagnose(model, x, y, eps, alpha, info.num_classes, autocast,
                                         min(1000, args.square_queries))
        dg = report["diagnostics"]
        print(f"diagnostics on {len(y)} images: mean |logit| {dg['mean_abs_logit']:.1f}, zero CE gradient "
              f"{100 * dg['zero_grad_share']:.0f}%, PGD-20 CE {100 * dg['acc_pgd20_ce']:.1f}% vs CW "
              f"{100 * dg['acc_pgd20_cw']:.1f}%, eps sweep {', '.join(f'{100 * v:.0f}%' for v in dg['eps_sweep'].values())}")
        print(f"verdict: {dg['verdict']}")
    path = args.json or os.path.splitext(args.checkpoint)[0] + ".eval.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if args.examples and grid is not None:
        save_grid(args.examples, *grid, info.classes)
    return report


if __name__ == "__main__":
    common.run_main(main)
