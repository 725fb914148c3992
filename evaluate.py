"""evaluate.py: one strong, honest robustness evaluation for every robust-distill checkpoint.

    python evaluate.py runs/ltd-cifar10-wrn-34-10/best.pt --preset standard      # "AA-lite" on the full test set
    python evaluate.py CKPT --preset quick --diagnose --examples grid.png        # PGD-20 + CW, masking checks
    python evaluate.py CKPT --attacks fgsm,pgd100 --n 2000 --eps 0.0157
    python evaluate.py CKPT --transfer-from runs/other/best.pt --transfer-steps 200   # gray/black-box transfer

Threat model L-infinity; eps 8/255 (CIFAR/SVHN), 0.3 (MNIST), 4/255 (large folders) unless --eps.
Attacks (written here from their papers, no extra dependency):
  fgsm, pgd20, pgd100 (CE, random start), cw (PGD-20 on the logit margin, "CW-inf"),
  apgd-ce, apgd-t (Croce & Hein 2020: APGD with momentum 0.75, step halving at checkpoints, 100 iterations;
  APGD-T = targeted DLR against the min(9, classes - 1) next most likely classes), square (Andriushchenko
  et al. 2020, score-based black-box, 5,000 queries with AutoAttack's schedule), transfer (PGD crafted on
  --transfer-from, --transfer-steps iterations), and autoattack (the official package, only if installed).
Presets: quick = pgd20 + cw on 1,000 images; standard = apgd-ce + apgd-t ("AA-lite": AutoAttack without
FAB-T and Square) on the full test set; full = standard + square.
Like AutoAttack, each attack runs only on the images that are still robust, and robust accuracy is the
per-image worst case over all attacks run. --diagnose adds the gradient-masking checks of Carlini et al.
2019 ("On Evaluating Adversarial Robustness") and prints a verdict.
The verdict is a set of one-sided exact binomial tests on per-image outcomes (each at a 1% false-positive
rate), and every accuracy comes with its count and a 95% Wilson interval.
Precision: float32 with TF32 off and cudnn.benchmark off while evaluating: stricter than AutoAttack and
RobustBench, which run in PyTorch's default (cuDNN convolutions in TF32 on Ampere and newer GPUs). --amp
computes attack gradients under bf16 autocast for a quicker look; even then every decision (broken? best
point? target hit? Square step kept?) is taken on float32 logits, the precision of the final verdict, and
the report says "bf16".
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import common

PRESETS = {"quick": ["pgd20", "cw"], "standard": ["apgd-ce", "apgd-t"], "full": ["apgd-ce", "apgd-t", "square"]}
ATTACKS = ("fgsm", "pgd20", "pgd100", "cw", "apgd-ce", "apgd-t", "square", "transfer", "autoattack")


# ------------------------------------------------------------------------------------- Precision
predict_logits = common.predict_logits  # the verdict's logits: float32, autocast off; "broken" is decided there


def predict(model, x):
    return predict_logits(model, x).argmax(1)


@contextlib.contextmanager
def strict_float32():
    """TF32 off for convolutions and matmuls while evaluating (it rounds float32 inputs to 10 mantissa bits
    on Ampere and newer GPUs), and cudnn.benchmark off (a training run in the same process may have left it on;
    it picks algorithms by timing); the previous settings come back afterwards. PyTorch >= 2.9 has the
    `fp32_precision` API, and reading the legacy `allow_tf32` flags raises once anything used it: then only
    the new API is used."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    new_api = hasattr(getattr(cudnn, "conv", None), "fp32_precision")
    saved_benchmark = cudnn.benchmark
    if new_api:
        saved = cudnn.conv.fp32_precision, matmul.fp32_precision
        cudnn.conv.fp32_precision = matmul.fp32_precision = "ieee"
    else:
        saved = cudnn.allow_tf32, matmul.allow_tf32
        cudnn.allow_tf32 = matmul.allow_tf32 = False
    cudnn.benchmark = False
    try:
        yield
    finally:
        if new_api:
            cudnn.conv.fp32_precision, matmul.fp32_precision = saved
        else:
            cudnn.allow_tf32, matmul.allow_tf32 = saved
        cudnn.benchmark = saved_benchmark


# ---------------------------------------------------------------- Counts, intervals, exact tests
# An accuracy is k of n images, quoted with its 95% Wilson interval. Each masking check is a one-sided exact
# binomial test on per-image outcomes at ALPHA, with a null hypothesis that is an effect size ("breaks more
# than a share q0"), not "no difference": its answer converges as the number of images grows.
ALPHA = 0.01


def binom_tail(k, n, p):
    """P[X >= k] for X ~ Binomial(n, p), exact (summed in log space, no SciPy)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_comb = lambda i: math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
    terms = [log_comb(i) + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def wilson_interval(k, n, z=1.959964):
    """Wilson score interval (lo, hi) of the proportion k/n; z = 1.96 gives 95%. (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k <= 0 else max(0.0, center - half)), (1.0 if k >= n else min(1.0, center + half))


def format_accuracy(k, n):
    """'31.2% [27.3, 35.4], 156/500': the accuracy, its 95% Wilson interval and the count it came from."""
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / max(n, 1):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], {k}/{n}"


def share_test(R, b, q0):
    """Does an attack break more than a share q0 of the R images another left robust (it broke b of them)?
    p = P[Binomial(R, q0) >= b]; p < ALPHA says yes at 99% confidence. Heterogeneous per-image chances only
    shrink the variance, so the test is conservative."""
    return {"R": R, "b": b, "share": b / R if R else None, "q0": q0, "p": binom_tail(b, R, q0)}


def paired_test(u, v, n, min_effect=0.01):
    """Is attack A weaker than attack B by more than `min_effect` of the n images? u = images A leaves robust
    and B breaks, v = the reverse. Exact one-sided McNemar test (p = P[Binomial(u + v, 1/2) >= u]) plus the
    minimum effect (u - v >= min_effect * n): significant and large enough to matter."""
    p = binom_tail(u, u + v, 0.5)
    return {"a_only": u, "b_only": v, "effect": (u - v) / max(n, 1), "p": p,
            "significant": p < ALPHA and u - v >= min_effect * n}


def not_learned(correct, n, num_classes):
    """A verdict if clean accuracy is near chance, else None: a model is judged only if it reaches twice chance
    (75% for 2 classes) and is above chance at 99% confidence (on few images a chance model can pass the first).
    A model that has not learned has no robustness to measure, and masking checks on it mean nothing."""
    chance = 1 / num_classes
    if correct >= min(2 * chance, (1 + chance) / 2) * n and binom_tail(correct, n, chance) < ALPHA:
        return None
    return (f"model has not learned: clean accuracy {format_accuracy(correct, n)} is near chance "
            f"({100 / num_classes:.0f}% for {num_classes} classes); robustness and masking checks are not meaningful")


# ----------------------------------------------------------------------------------------- APGD
def dlr_loss(logits, y):
    """Per-sample DLR loss of Croce & Hein 2020 (maximised): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)."""
    z = logits.float()
    zs = z.sort(1, descending=True).values
    return common.cw_margin_loss(z, y) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Targeted DLR (maximised): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    z = logits.float()
    zs = z.sort(1, descending=True).values
    z_y, z_t = z.gather(1, y[:, None]).squeeze(1), z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def apgd(model, x, y, eps, n_iter=100, loss="ce", target=None, rho=0.75):
    """APGD (Croce & Hein 2020) for L-inf. loss: 'ce', 'dlr' or 'dlr-t' (targeted, needs `target`).

    Returns, as the official code, the last misclassified iterate for broken points, else the highest-loss
    point. Under autocast the gradient comes from the bf16 forward and every decision from a float32 one.
    """
    def loss_of(logits):
        return (F.cross_entropy(logits, y, reduction="none") if loss == "ce" else dlr_loss(logits, y)
                if loss == "dlr" else dlr_targeted_loss(logits, y, target))

    def loss_and_grad(z):
        z = z.clone().requires_grad_(True)
        logits = model(z).float()
        value = loss_of(logits)
        grad, = torch.autograd.grad(value.sum(), z)
        if torch.is_autocast_enabled(z.device.type):  # decide on a float32 forward, not on the bf16 one
            logits = predict_logits(model, z.detach())
            value = loss_of(logits)
        return value.detach(), grad.detach().contiguous(), logits.detach().argmax(1) != y

    project = lambda z: torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1)
    t = torch.rand_like(x) * 2 - 1
    x_cur = project(x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1))
    value, grad, wrong = loss_and_grad(x_cur)
    x_out, broken = torch.where(wrong.view(-1, 1, 1, 1), x_cur, x), wrong.clone()
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
        x_out[wrong], broken = x_cur[wrong], broken | wrong  # the official x_best_adv[ind_pred] = x_adv[ind_pred]
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


def apgd_targeted(model, x, y, eps, n_iter=100, n_targets=9, status=None):
    """APGD-T: one targeted-DLR run per target class, ranked 2nd..(n_targets+1)th by the clean float32 logits;
    a target counts as a hit only if the float32 verdict says so (then no further targets for that image)."""
    order = predict_logits(model, x).scatter(1, y[:, None], float("inf")).argsort(1, descending=True)
    x_adv, alive = x.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
    k = min(n_targets, order.shape[1] - 1)
    for r in range(1, k + 1):
        idx = alive.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        if status:
            status(f"apgd-t target {r}/{k} on {len(idx)} images")
        adv = apgd(model, x[idx], y[idx], eps, n_iter, "dlr-t", target=order[idx, r])
        hit = predict(model, adv) != y[idx]
        x_adv[idx[hit]], alive[idx[hit]] = adv[hit], False
    return x_adv


# --------------------------------------------------------------------------------------- Square
SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # queries after which p halves


def square_size(i, h, w, p_init=0.8):
    """Side of the square at iteration i, AutoAttack's configuration (resc_schedule=False: the schedule is
    indexed by the query number itself, not rescaled to 10,000 queries): s = round(sqrt(p h w))."""
    p = p_init / 2 ** sum(i > t for t in SQUARE_HALVINGS)
    return max(min(int(round(math.sqrt(p * h * w))), h - 1, w - 1), 1)


def square_attack(model, x, y, eps, n_queries=5000, p_init=0.8):
    """Square attack, L-inf (Andriushchenko et al. 2020): random square updates of +-eps, kept when the
    float32 margin z_y - max_{i!=y} z_i decreases; one initial query plus `n_queries` iterations, as
    AutoAttack counts them. A window whose new signs would change nothing is re-drawn (original Square code)."""
    margin = lambda z, labels: -common.cw_margin_loss(predict_logits(model, z), labels)
    b, c, h, w = x.shape
    rand_signs = lambda *shape: torch.randint(0, 2, shape, device=x.device).float().mul(2).sub(1)
    x_adv = (x + eps * rand_signs(b, c, 1, w)).clamp(0, 1)  # vertical stripes of +-eps
    m = margin(x_adv, y)
    rows, cols = torch.arange(h, device=x.device).view(1, 1, h, 1), torch.arange(w, device=x.device).view(1, 1, 1, w)
    for i in range(n_queries):
        todo = (m > 0).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        s, n = square_size(i, h, w, p_init), len(todo)
        r0 = torch.randint(0, h - s + 1, (n, 1, 1, 1), device=x.device)
        c0 = torch.randint(0, w - s + 1, (n, 1, 1, 1), device=x.device)
        window = (rows >= r0) & (rows < r0 + s) & (cols >= c0) & (cols < c0 + s)
        xs, cur, signs = x[todo], x_adv[todo], rand_signs(n, c, 1, 1)
        for _ in range(10):
            cand = torch.where(window, (xs + eps * signs).clamp(0, 1), cur)
            same = (cand == cur).flatten(1).all(1)
            if not same.any():
                break
            signs[same] = rand_signs(int(same.sum()), c, 1, 1)
        m_new = margin(cand, y[todo])
        keep = m_new < m[todo]
        x_adv[todo[keep]], m[todo[keep]] = cand[keep], m_new[keep]
    return x_adv


# ------------------------------------------------------------------------------------ The cascade
def run_attack(name, model, x, y, eps, alpha, source=None, apgd_iters=100, square_queries=5000, transfer_steps=20,
               status=None, seed=0):
    """Adversarial examples for one attack on a batch of (still robust) images. `seed` only reaches the
    official AutoAttack, which reseeds the global generator with it before each of its attacks."""
    if name == "fgsm":
        return common.pgd(model, x, y, eps, eps, 1, random_start=False)
    if name in ("pgd20", "pgd100"):
        return common.pgd(model, x, y, eps, alpha, int(name[3:]))
    if name == "cw":
        return common.pgd(model, x, y, eps, alpha, 20, loss="cw")
    if name == "apgd-ce":
        return apgd(model, x, y, eps, apgd_iters, "ce")
    if name == "apgd-t":
        return apgd_targeted(model, x, y, eps, apgd_iters, status=status)
    if name == "square":
        return square_attack(model, x, y, eps, square_queries)
    if name == "transfer":
        return common.pgd(source, x, y, eps, alpha, transfer_steps)
    if name == "autoattack":
        with torch.autocast(x.device.type, enabled=False):  # the reference runs in the model's own float32
            # seed=None would make it reseed the global generator from the clock, ignoring --seed
            aa = official_autoattack()(model, norm="Linf", eps=eps, version="standard", device=x.device, seed=seed)
            targets = min(9, predict_logits(model, x[:1]).shape[1] - 1)  # its default 9 needs 10+ classes
            aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = targets
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


def cascade(model, x, y, names, attack, eps, autocast, seconds, status=None):
    """Run the attacks one after another, each only on the images still robust (as AutoAttack does).

    Returns ({"clean"/name: bool mask of images still robust after it}, the adversarial images found) and
    adds each attack's time to `seconds`. An image broken by any attack stays broken: worst case per image.
    Broken means misclassified by the float32 verdict, whatever precision the attack ran in.
    """
    sync(x.device); t = time.time()
    alive = predict(model, x) == y
    sync(x.device); seconds["clean"] += time.time() - t
    masks, x_show = {"clean": alive.clone()}, x.clone()
    for name in names:
        idx = alive.nonzero().squeeze(1)
        sync(x.device); t = time.time()
        if len(idx):
            if status:
                status(f"{name} on {len(idx)} still robust")
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


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # this GPU's work, not the current device's


def protocol_label(names, num_classes, apgd_iters=100, square_queries=5000, pgd_step=None):
    """What was run, in words that cannot be mistaken for full AutoAttack: a preset by its name only at its
    default budgets, anything else "custom" with the settings that differ (pgd_step: a non-default --alpha)."""
    targets = f"{min(9, num_classes - 1)} targets"
    ran = set(names)
    changed = ([f"apgd_iters={apgd_iters}"] if apgd_iters != 100 and {"apgd-ce", "apgd-t"} & ran else []) + \
              ([f"square_queries={square_queries}"] if square_queries != 5000 and "square" in ran else []) + \
              ([f"pgd_step={pgd_step:.4g}"] if pgd_step is not None and {"pgd20", "pgd100", "cw", "transfer"} & ran else [])
    if not changed:
        if names == PRESETS["quick"]:
            return "quick: pgd20, cw"
        if names == ["apgd-ce", "apgd-t"]:
            return f"AA-lite: apgd-ce, apgd-t ({targets}; no FAB-T, no Square)"
        if names == ["apgd-ce", "apgd-t", "square"]:
            return f"AA-lite + Square: apgd-ce, apgd-t ({targets}), square (no FAB-T)"
        if names == ["autoattack"]:
            return f"AutoAttack, official package, version standard ({targets})"
    return "custom: " + ", ".join(names) + (f" ({'; '.join(changed)})" if changed else "")


Q0_APGD_T = 0.25  # APGD-T after APGD-CE: honest CIFAR-like models lose a few percent of APGD-CE's robust images


def apgd_t_test(names, robust_after):
    """R = images robust after APGD-CE, b = those APGD-T (targeted DLR) then breaks, tested against a share
    Q0_APGD_T; None unless APGD-T ran right after APGD-CE."""
    pos = {k: i for i, k in enumerate(names)}
    if "apgd-ce" not in pos or pos.get("apgd-t", -1) != pos["apgd-ce"] + 1:
        return None
    return share_test(robust_after["apgd-ce"], robust_after["apgd-ce"] - robust_after["apgd-t"], Q0_APGD_T)


def cascade_warnings(names, robust_after, n):
    """AutoAttack-style hints from the cascade's counts (`robust_after`: images still robust after each attack,
    of n); messages out."""
    out, pos = [], {k: i for i, k in enumerate(names)}
    t = apgd_t_test(names, robust_after)
    if t and t["p"] < ALPHA:
        out.append(f"hint: APGD-T (targeted DLR) breaks {t['b']} of the {t['R']} images APGD-CE left robust "
                   f"({100 * t['share']:.0f}%, more than {100 * Q0_APGD_T:.0f}% at 99% confidence, p = {t['p']:.2g}): "
                   f"cross-entropy overstates this model's robustness, a classic sign of a masked CE gradient "
                   f"(AA-lite's DLR loss is scale-free and not affected; --diagnose checks it)")
    if "square" in pos and pos["square"] > 0 and any(k.startswith("apgd") for k in names[:pos["square"]]):
        drop = (robust_after[names[pos["square"] - 1]] - robust_after["square"]) / max(n, 1)
        if drop > 0.002:
            out.append(f"warning: the black-box Square attack lowered robust accuracy by {100 * drop:.2f} points after "
                       f"the white-box attacks (AutoAttack's own check warns above 0.2): the gradients may be masked")
    return out


# --------------------------------------------------------------------------------- Diagnostics
# The CE-vs-margin null share: flag when, at 99% confidence, the margin attack breaks more than Q0_CE_MARGIN of
# the images PGD-20 on cross-entropy leaves robust, i.e. CE overstates robust accuracy more than 1 / (1 - Q0).
# Why 1/2 and not 2/3: under-trained but honest adversarially trained MNIST models break at shares of about
# 0.2-0.35 (so 1/2 leaves room), defensive distillation at 0.6-1; and with 2/3, masking at low robust accuracy
# (CE 8%, margin 0%: about 16 CE-robust images of 200) would need 12 images all broken and be missed often.
Q0_CE_MARGIN = 0.5
SQUARE_SHARE = 0.01  # Square breaking over 1% of the white-box-robust images (~AutoAttack's 0.2 points of all)


def masking_checks(ok, dlr_in_cascade=False, square_queries=1000):
    """The paired checks on per-image outcomes: `ok` maps "clean", "fgsm", "pgd20", "pgd100", "cw" (PGD-20 on the
    logit margin) and "square" to bool tensors over the same images (True: still classified correctly), and
    optionally "white_box" (robust to every white-box attack of the evaluation run). Returns (stats, reasons).

    Each check is a one-sided exact binomial test at ALPHA among the images a reference attack left robust:
    - CE-vs-margin: of the R clean images PGD-20 on CE leaves robust, the margin attack breaks b; flag if the
      share exceeds Q0_CE_MARGIN (CE then overstates robust accuracy more than 1 / (1 - Q0_CE_MARGIN)).
    - Square: of the images every white-box attack left robust, black-box Square breaks more than SQUARE_SHARE.
    - FGSM beats PGD-20, PGD-100 loses to PGD-20: exact McNemar tests with a 1-point minimum effect.
    """
    count = lambda m: int(m.sum())
    n, clean = len(ok["clean"]), ok["clean"]
    stats, reasons = {}, []
    ce = clean & ok["pgd20"]
    t = stats["ce_vs_margin"] = share_test(count(ce), count(ce & ~ok["cw"]), Q0_CE_MARGIN)
    if t["p"] < ALPHA:
        R, b = t["R"], t["b"]
        how = f"about {R / (R - b):.1f}x" if b < R else "entirely: the margin attack breaks every image CE leaves robust"
        reasons.append(f"CE-vs-margin: PGD-20 on the logit margin breaks {b} of the {R} images PGD-20 on cross-entropy "
                       f"leaves robust ({100 * b / R:.0f}%, more than {100 * Q0_CE_MARGIN:.0f}% at 99% confidence, "
                       f"p = {t['p']:.2g}): cross-entropy overstates robustness {how}"
                       + ("; AA-lite's DLR loss (APGD-T) is not affected" if dlr_in_cascade else ""))
    t = stats["fgsm_beats_pgd20"] = paired_test(count(clean & ok["pgd20"] & ~ok["fgsm"]),
                                                count(clean & ~ok["pgd20"] & ok["fgsm"]), n)
    if t["significant"]:
        reasons.append(f"single-step FGSM beats iterative PGD-20 by {100 * t['effect']:.1f} points (p = {t['p']:.2g})")
    t = stats["pgd100_loses_to_pgd20"] = paired_test(count(clean & ok["pgd100"] & ~ok["pgd20"]),
                                                     count(clean & ~ok["pgd100"] & ok["pgd20"]), n)
    if t["significant"]:
        reasons.append(f"more PGD steps helped the defence: PGD-100 leaves {100 * t['effect']:.1f} points more than "
                       f"PGD-20 (p = {t['p']:.2g})")
    wb = clean & ok["fgsm"] & ok["pgd20"] & ok["pgd100"] & ok["cw"]
    if "white_box" in ok:
        wb = wb & ok["white_box"]
    t = stats["square_among_white_box_robust"] = share_test(count(wb), count(wb & ~ok["square"]), SQUARE_SHARE)
    if t["p"] < ALPHA:
        reasons.append(f"black-box Square ({square_queries} queries) breaks {t['b']} of the {t['R']} images every "
                       f"white-box attack left robust ({100 * t['share']:.1f}%, more than {100 * SQUARE_SHARE:.0f}% "
                       f"at 99% confidence, p = {t['p']:.2g})")
    return stats, reasons


def diagnose(model, x, y, eps, alpha, num_classes, autocast, square_queries=1000, status=None, batch_size=None,
             robust_mask=None, dlr_in_cascade=False):
    """Gradient-masking checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness", section 5).

    Every accuracy is a float32 verdict; Square runs in float32 whatever the autocast. Attacks run
    `batch_size` images at a time. robust_mask: images robust to every white-box attack of the evaluation run
    (Square is then judged against those). A model with non-finite outputs or near chance is not judged.
    """
    n, bs = len(y), batch_size or len(y)
    chunks = lambda: ((x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs))
    per_image = lambda f: torch.cat([f(xb, yb) for xb, yb in chunks()])
    d, reasons = {"n": n}, []
    z = per_image(lambda xb, yb: predict_logits(model, xb))  # diagnostics in float32: saturation is numerical
    bad = int((~torch.isfinite(z).all(1)).sum())
    unjudged = (f"non-finite outputs: the model returns NaN or inf logits on {bad} of {n} clean images; it cannot "
                f"be judged robust or masked" if bad else not_learned(int((z.argmax(1) == y).sum()), n, num_classes))
    if unjudged:
        d.update(judged=False, reasons=[], masking_suspected=None, verdict=unjudged)
        return d
    d["judged"] = True
    top2 = z.topk(2, 1).values
    d["mean_abs_logit"] = z.abs().mean().item()
    d["mean_top2_margin"] = (top2[:, 0] - top2[:, 1]).mean().item()
    d["saturated_softmax_share"] = (F.softmax(z, 1).amax(1) == 1.0).float().mean().item()
    margin_loss = dlr_loss if num_classes >= 3 else common.cw_margin_loss

    correct = z.argmax(1) == y

    def zero_grad(loss):
        def f(xb, yb):
            xg = xb.clone().requires_grad_(True)
            g, = torch.autograd.grad(loss(model(xg).float(), yb).sum(), xg)
            return g.flatten(1).abs().amax(1) == 0
        return int((per_image(f) & correct).sum())
    # Counted among the correctly classified images only, the ones an attack runs on (as AutoAttack's warning
    # is): a misclassified image whose true class ranks third has a DLR of exactly 1, so a zero DLR gradient,
    # which says nothing about masking. AutoAttack warns on any zero-gradient image; the verdict uses the share.
    d["n_correct"] = nc = int(correct.sum())
    d["zero_grad_images"] = zero_grad(lambda o, t: F.cross_entropy(o, t, reduction="none"))
    d["zero_grad_images_dlr"] = zero_grad(margin_loss)
    d["zero_grad_share"], d["zero_grad_share_dlr"] = d["zero_grad_images"] / nc, d["zero_grad_images_dlr"] / nc
    ok_after = lambda attack: per_image(lambda xb, yb: predict(model, attack(xb, yb)) == yb)  # per image
    step = lambda name: status(name) if status else None
    ok = {"clean": correct}
    with autocast():
        step("fgsm"); ok["fgsm"] = ok_after(lambda a, b: common.pgd(model, a, b, eps, eps, 1, random_start=False))
        step("pgd20"); ok["pgd20"] = ok_after(lambda a, b: common.pgd(model, a, b, eps, alpha, 20))
        step("pgd100"); ok["pgd100"] = ok_after(lambda a, b: common.pgd(model, a, b, eps, alpha, 100))
        step("pgd20 on the margin")
        ok["cw"] = ok_after(lambda a, b: common.pgd(model, a, b, eps, alpha, 20, loss="cw"))
        step("square"); ok["square"] = ok_after(lambda a, b: square_attack(model, a, b, eps, n_queries=square_queries))
        sweep = sorted({min(eps * f, 0.5) for f in (1, 2, 4)} | {0.5})
        step("eps sweep")
        sweep_counts = {f"{e:.4f}": int(ok_after(lambda a, b: common.pgd(model, a, b, e, e / 4, 20, loss="cw")).sum())
                        for e in sweep}
    keys = {"clean": "clean", "fgsm": "fgsm", "pgd20": "pgd20_ce", "pgd100": "pgd100_ce", "cw": "pgd20_cw",
            "square": "square"}
    d["counts"] = {keys[k]: int(v.sum()) for k, v in ok.items()}
    for k, v in d["counts"].items():
        d["acc_" + k] = v / n
    d["ci95"] = {k: list(wilson_interval(v, n)) for k, v in d["counts"].items()}
    d["eps_sweep_counts"], d["eps_sweep"] = sweep_counts, {e: v / n for e, v in sweep_counts.items()}
    if robust_mask is not None:
        ok["white_box"] = robust_mask
    stats, reasons = masking_checks(ok, dlr_in_cascade, square_queries)
    d.update(stats)
    d["square_only_images"] = stats["square_among_white_box_robust"]["b"]  # broken by Square alone
    for share, loss in ((d["zero_grad_share"], "CE"), (d["zero_grad_share_dlr"], "DLR" if num_classes >= 3 else "margin")):
        if share > 0.10:
            reasons.append(f"{100 * share:.0f}% of the correctly classified images have an exactly zero input "
                           f"gradient of the {loss} loss")
    if d["saturated_softmax_share"] > 0.5 and d["mean_abs_logit"] > 50:
        reasons.append(f"saturated softmax: mean |logit| {d['mean_abs_logit']:.0f}, max probability exactly 1 for "
                       f"{100 * d['saturated_softmax_share']:.0f}% of images")
    accs = list(d["eps_sweep"].values())
    if accs[-1] > max(0.05, 1.5 / num_classes):
        reasons.append(f"accuracy does not reach ~0 as eps grows ({100 * accs[-1]:.1f}% at eps 0.5)")
    if any(b > a + 0.05 for a, b in zip(accs, accs[1:])):
        reasons.append("accuracy rises with a larger eps")
    d["reasons"], d["masking_suspected"] = reasons, bool(reasons)
    d["verdict"] = ("gradient masking suspected: " + "; ".join(reasons)) if reasons else "no sign of gradient masking"
    return d


# ---------------------------------------------------------------------------------------- Output
def write_report(path, report):
    """The JSON report, written atomically (a temp file beside it, then os.replace): never half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def print_diagnostics(d, square_queries):
    """The diagnostics as a small table: every accuracy with its interval and count, then the tests."""
    n = d["n"]
    print(f"diagnostics on {n} images:")
    if not d["judged"]:
        print(f"verdict: {d['verdict']}")
        return
    labels = {"clean": "clean", "fgsm": "FGSM", "pgd20_ce": "PGD-20 (CE)", "pgd100_ce": "PGD-100 (CE)",
              "pgd20_cw": "PGD-20 (margin)", "square": f"Square ({square_queries} q)"}
    for k, label in labels.items():
        print(f"  {label:<20}{format_accuracy(d['counts'][k], n):>32}")
    for e, k in d["eps_sweep_counts"].items():
        print(f"  {'eps ' + e + ' (margin)':<20}{format_accuracy(k, n):>32}")
    t, sq = d["ce_vs_margin"], d["square_among_white_box_robust"]
    share = lambda t: "" if t["R"] == 0 else f" ({100 * t['share']:.1f}%)"
    nc = d["n_correct"]
    print(f"  mean |logit| {d['mean_abs_logit']:.1f}; zero input gradient, of the {nc} correctly classified: "
          f"CE {d['zero_grad_images']}/{nc}, DLR {d['zero_grad_images_dlr']}/{nc}")
    print(f"  CE vs margin: the margin attack breaks {t['b']} of the {t['R']} images CE leaves robust{share(t)}, "
          f"p = {t['p']:.2g} against {100 * t['q0']:.0f}%")
    print(f"  Square breaks {sq['b']} of the {sq['R']} images every white-box attack left robust{share(sq)}, "
          f"p = {sq['p']:.2g} against {100 * sq['q0']:.0f}%")
    print(f"verdict: {d['verdict']}")


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
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per attack batch (default: {DEFAULT_BATCH}; on images of "
                        f"{common.IMAGENET_STEM_FROM} px and up, at most what fits a 24 GB GPU in float32)")
    p.add_argument("--apgd-iters", type=int, default=100, help="APGD iterations (AutoAttack: 100)")
    p.add_argument("--square-queries", type=int, default=5000, help="Square queries (AutoAttack: 5,000)")
    p.add_argument("--transfer-from", default=None, help="source checkpoint for the transfer attack")
    p.add_argument("--transfer-steps", type=int, default=20, help="PGD iterations of the transfer attack")
    p.add_argument("--diagnose", action="store_true", help="run the gradient-masking checks")
    p.add_argument("--diagnose-n", type=int, default=500, help="images used by the diagnostics (a seeded random subset)")
    p.add_argument("--json", default=None, help="report path (default: <checkpoint>.eval.json)")
    p.add_argument("--examples", default=None, help="write a PNG grid of clean vs adversarial images")
    p.add_argument("--dataset", default=None, help="override the checkpoint's dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--skip-bad-images", action="store_true", help="folder trees: leave out unreadable files")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="attack gradients under bf16 autocast (quicker, labelled bf16; decisions stay float32)")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        with strict_float32():
            return evaluate(args)
    except torch.OutOfMemoryError:
        pass  # leave the except block first: its traceback holds the batch's tensors
    batch = args.batch_size or DEFAULT_BATCH  # None: it ran out before the default was chosen
    raise common.UserError(f"out of GPU memory at --batch-size {batch}: try --batch-size "
                           f"{max(1, batch // 2)} (README, 'Memory': what fits a 24 or 80 GB GPU per arch)"
                           + ("; --diagnose attacks its --diagnose-n images in one batch: lower --diagnose-n too"
                              if args.diagnose else ""))


DEFAULT_BATCH, DEFAULT_GPU_BYTES = 500, 24 * 10 ** 9


def default_batch_size(models, info):
    """--batch-size when not given: DEFAULT_BATCH, on large images at most what fits a 24 GB GPU in float32 for
    every model attacked (common.batch_that_fits, counted on one image; at 224 px e.g. 158 for resnet50, 174
    for mobilenet_v2, 500 for resnet18)."""
    if info.size < common.IMAGENET_STEM_FROM:
        return DEFAULT_BATCH
    fits = [common.batch_that_fits(common.activation_bytes(m, (info.channels, info.size, info.size))[1],
                                   sum(p.numel() for p in m.parameters()), DEFAULT_GPU_BYTES) for m in models]
    return max(1, min([DEFAULT_BATCH] + fits))


def evaluate(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model, ck = common.build_model_from_checkpoint(args.checkpoint, device)
    dataset = args.dataset or ck["dataset"]
    data_dir = args.data_dir or ck["args"].get("data_dir", "./data")
    (xs, ys), info = common.load_dataset(dataset, data_dir, train=False, skip_bad=args.skip_bad_images)
    if (info.num_classes, info.channels, info.size) != (ck["num_classes"], ck.get("in_channels", 3), ck.get("image_size", 32)):
        raise common.UserError(f"dataset mismatch: checkpoint expects {ck['num_classes']} classes of "
                               f"{ck.get('in_channels', 3)}x{ck.get('image_size', 32)}px ({ck['dataset']}), but "
                               f"'{dataset}' has {info.num_classes} classes of {info.channels}x{info.size}px")
    names = list(dict.fromkeys(args.attacks.split(","))) if args.attacks else list(PRESETS[args.preset])  # no repeats
    for name in names:
        if name not in ATTACKS:
            raise common.UserError(f"unknown attack '{name}' (choose from {', '.join(ATTACKS)})")
    for flag, v in (("--transfer-steps", args.transfer_steps), ("--batch-size", args.batch_size), ("--n", args.n),
                    ("--diagnose-n", args.diagnose_n), ("--apgd-iters", args.apgd_iters),
                    ("--square-queries", args.square_queries)):
        if v is not None and v < 1:
            raise common.UserError(f"{flag} must be >= 1, got {v}")
    if args.eps is not None:
        common.check_eps(args.eps)
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        raise common.UserError(f"--alpha (the PGD step) must be > 0, got {args.alpha}")
    # before any attack: the report and the grid must have somewhere to go
    for flag, path in (("--json", args.json or os.path.splitext(args.checkpoint)[0] + ".eval.json"),
                       ("--examples", args.examples)):
        if path:
            common.check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    if "autoattack" in names and official_autoattack() is None:
        raise common.UserError("--attacks autoattack needs the official package installed: fra31/auto-attack "
                               "(imports as autoattack) or its PyPI copy pyautoattack")
    skipped = {}
    if "apgd-t" in names and info.num_classes < 4:  # targeted DLR reads the 3rd and 4th largest logits
        names.remove("apgd-t")
        skipped["apgd-t"] = f"needs 4+ classes, {dataset} has {info.num_classes}"
    if "autoattack" in names and info.num_classes < 4:  # the official APGD-T as well
        names.remove("autoattack")
        skipped["autoattack"] = f"needs 4+ classes, {dataset} has {info.num_classes}"
    source = None
    if "transfer" in names or args.transfer_from:
        if not args.transfer_from:
            raise common.UserError("the transfer attack needs --transfer-from OTHER.pt")
        source, sck = common.build_model_from_checkpoint(args.transfer_from, device)
        if sck["num_classes"] != ck["num_classes"] or sck["dataset"] != ck["dataset"]:
            raise common.UserError(f"--transfer-from was trained on {sck['dataset']}, the target on {ck['dataset']}")
        names = names + ["transfer"] if "transfer" not in names else names
    if args.batch_size is None:
        args.batch_size = default_batch_size([model] + ([source] if source is not None else []), info)
    eps = args.eps if args.eps is not None else info.eps
    alpha = args.alpha if args.alpha is not None else eps / 4  # 2/255 at 8/255; 0.075 on MNIST (0.3)
    n_all = len(xs) if ys is not None else len(xs.samples)
    n = min(args.n or (1000 if args.preset == "quick" and not args.attacks else n_all), n_all)
    # A fixed random subset, not the first n: folder trees are stored class by class.
    idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:n] if n < n_all else torch.arange(n_all)
    subset = lambda ii: (Subset(xs, ii.tolist()), None) if ys is None else (xs[ii], ys[ii])
    loader = common.make_loader(subset(idx), info, args.batch_size, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext
    precision = ("bf16 autocast for attack gradients, every decision in float32" if args.amp else "float32") + \
        (", TF32 off" if device.type == "cuda" else "")
    protocol = protocol_label(names, info.num_classes, args.apgd_iters, args.square_queries,
                              None if args.alpha is None else alpha) + "".join(f"; {k} skipped ({v})" for k, v in skipped.items())

    print(f"{args.checkpoint}: method {ck['method']}, arch {ck['arch']}, {dataset}, deployed temperature {model.temperature:g}")
    print(f"L-inf eps {eps:.4f} ({eps * 255:.1f}/255), {n} test images, {protocol}, precision: {precision}", flush=True)
    correct, robust_after, per_image = 0, {k: 0 for k in names}, {"clean": [], "robust": []}
    white_box = [k for k in names if k not in ("square", "transfer")]
    robust_white_box = []  # per image: robust to every white-box attack (the diagnostics judge Square against it)
    seconds = {k: 0.0 for k in ["clean"] + names}
    grid, bar, nb = None, common.Progress(n, "evaluating", enabled=not args.quiet), len(loader)
    attack = lambda name, xa, ya: run_attack(name, model, xa, ya, eps, alpha, source, args.apgd_iters,
                                             args.square_queries, args.transfer_steps, status, args.seed)
    try:
        for b, (x, y) in enumerate(loader):
            so_far = f"robust so far {100 * robust_after[names[-1]] / bar.done:.1f}%  " if names and bar.done else ""
            status = lambda what: setattr(bar, "note", f"{so_far}[batch {b + 1}/{nb}: {what}]")
            bad = (~torch.isfinite(predict_logits(model, x))).any(1).sum().item()
            if bad:  # argmax would read NaN as class 0: scored, it would look as robust as it is accurate
                raise common.UserError(f"{args.checkpoint}: the model outputs NaN/inf on {bad} of {len(y)} test images: "
                                       f"it is broken, not robust (retrain it, e.g. with a lower --lr)")
            alive, x_show = cascade(model, x, y, names, attack, eps, autocast, seconds, status)
            correct += alive["clean"].sum().item()
            per_image["clean"] += alive["clean"].tolist()
            per_image["robust"] += alive[names[-1] if names else "clean"].tolist()
            for name in names:
                robust_after[name] += alive[name].sum().item()
            robust_white_box.append(alive[white_box[-1] if white_box else "clean"].cpu())
            bar.done += len(y)
            if grid is None:
                grid = (x, x_show, y, predict(model, x_show))
    finally:
        bar.close()

    acc_after = {k: robust_after[k] / n for k in names}
    robust = robust_after[names[-1]] if names else correct
    ci = lambda k: list(wilson_interval(k, n))
    unlearned = not_learned(correct, n, info.num_classes)
    report = {"checkpoint": os.path.abspath(args.checkpoint), "method": ck["method"], "arch": ck["arch"],
              "dataset": dataset, "temperature": model.temperature, "epoch": ck["epoch"] + 1, "train_metrics": ck["metrics"],
              "n": n, "eps": eps, "alpha": alpha, "protocol": protocol, "precision": precision, "skipped": skipped,
              "attack_settings": {"pgd_step": alpha, "apgd_iters": args.apgd_iters, "apgd_restarts": 1,
                                  "apgd_t_targets": min(9, info.num_classes - 1), "square_queries": args.square_queries,
                                  "square_schedule": "AutoAttack (resc_schedule=False)", "transfer_from": args.transfer_from,
                                  "transfer_steps": args.transfer_steps, "amp": "bf16" if args.amp else "fp32",
                                  "batch_size": args.batch_size},
              "device": str(device), "clean_acc": correct / n, "clean_count": correct, "clean_ci95": ci(correct),
              "attacks": [{"name": k, "acc_after": acc_after[k], "count_after": robust_after[k],
                           "ci95_after": ci(robust_after[k]), "seconds": seconds[k]} for k in names],
              "robust_acc": robust / n, "robust_count": robust, "robust_ci95": ci(robust), "seconds": seconds,
              "apgd_t_after_apgd_ce": apgd_t_test(names, robust_after),
              "warnings": [f"warning: {unlearned}"] if unlearned else cascade_warnings(names, robust_after, n),
              # per test image (dataset index; 1 = correct / robust to every attack): for paired comparisons
              "per_image": {"index": idx.tolist(), **{k: "".join("01"[b] for b in v) for k, v in per_image.items()}}}
    print(f"  {'clean':<16}{format_accuracy(correct, n):>32}  {seconds['clean']:8.1f}s")
    for a in report["attacks"]:
        print(f"  {'after ' + a['name']:<16}{format_accuracy(a['count_after'], n):>32}  {a['seconds']:8.1f}s")
    for w in report["warnings"]:
        print(w)
    path = args.json or os.path.splitext(args.checkpoint)[0] + ".eval.json"
    write_report(path, report)  # the cascade is safe on disk before the diagnostics start
    final = (f"robust accuracy ({protocol}; {precision}; per-image worst case): {format_accuracy(robust, n)}"
             + (" (not meaningful: the model has not learned)" if unlearned else ""))
    if args.diagnose:
        didx = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1))[:args.diagnose_n]
        batches = list(common.make_loader(subset(idx[didx]), info, args.batch_size, device))
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        bar = common.Progress(6, f"diagnostics on {len(y)} images", "checks", enabled=not args.quiet)
        check = lambda what: setattr(bar, "done", bar.done + bool(bar.note)) or setattr(bar, "note", what)
        try:
            report["diagnostics"] = dg = diagnose(model, x, y, eps, alpha, info.num_classes, autocast,
                                                  min(1000, args.square_queries), check, args.batch_size,
                                                  torch.cat(robust_white_box)[didx].to(device),
                                                  bool({"apgd-t", "autoattack"} & set(names)))
        finally:
            bar.close()
        print_diagnostics(dg, min(1000, args.square_queries))
        write_report(path, report)
    print(final)
    if args.examples and grid is not None:
        save_grid(args.examples, *grid, info.classes)
    return report


if __name__ == "__main__":
    common.run_main(main)
