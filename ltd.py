"""LTD: Low Temperature Distillation, on top of TRADES with adversarial weight perturbation (AWP).

Paper: Erh-Chung Chen, Che-Rung Lee, "LTD: Low Temperature Distillation for Robust Adversarial Training"
(v1 2021; v4 2025 retitled "... for Gradient Masking-free Adversarial Training"), arXiv:2111.02331.
Base methods: TRADES (Zhang et al., ICML 2019, arXiv:1901.08573) and AWP (Wu et al., NeurIPS 2020,
arXiv:2004.05884); the authors' CIFAR-10 logs point to the TRADES-AWP code (CIFAR-100's do not).

The idea. One-hot labels are wrong for ambiguous images. A teacher gives soft labels through a
temperature-scaled softmax at a "relatively low" temperature tau_t, and they replace the one-hot labels.
The student's logits are divided by its own fixed temperature tau_s, and this is kept at test
time as well. Defensive distillation trains at T and deploys at T = 1; that mismatch inflates the
logits and masks gradients. LTD has no such mismatch. tau_t == tau_s is allowed (see the fidelity note);
we do not force tau_t < tau_s, as "relatively low" may be relative to the usual KD temperatures rather
than to tau_s, so sweeps either way are allowed.

The loss, our [R] reconstruction; z(.) = f_S(.) / tau_s everywhere, beta = 6:
    p_t   = softmax(f_T(x) / tau_t)                       teacher frozen, eval mode, no grad
    x_adv = argmax_{|x'-x|_inf <= eps} KL(softmax(z(x)) || softmax(z(x')))   (TRADES inner max, eval mode)
    L     = -sum_k p_t[k] log softmax(z(x))[k]  +  beta * KL(softmax(z(x)) || softmax(z(x_adv)))
With --no-distill the natural term is CE(f(x), y) and tau_s = 1: TRADES-AWP, the baseline; with also
--no-awp it is the TRADES loss with the TRADES-AWP schedule (200 epochs, wd 5e-4, decays from the 100th and
150th epoch), not TRADES's own (76 epochs, wd 2e-4, attack step 0.007, decays from the 75th/90th/100th epoch:
--milestones 74 89 99): the log says so and the
checkpoint's args carry `recipe`. That checkpoint is also a TRADES teacher for infoard.py (RSLAD's kind).
AWP: before each update the weights w (tensors with dim > 1) move to w + v, where
v = gamma * |w| * g / |g| layer-wise and g = dL/dw. The update is w <- w - lr * grad L(w + v).
AWP is on from epoch 10 (the AWP code's --awp-warmup), in a run of fewer than 20 epochs from half of --epochs
(ours, so a short run still has it).

Run (teacher -> <out-dir>/teacher/best.pt, student -> <out-dir>/best.pt, deployed at temperature tau_s):
    python ltd.py --dataset cifar100                  # TRADES-AWP teacher (200 ep), then the LTD student
    python ltd.py --dataset cifar100 --no-distill     # the TRADES-AWP baseline -> runs/trades-awp-...
    python ltd.py --dataset cifar100 --teacher runs/trades-awp-cifar100-wrn-34-10/best.pt   # reuse it
    python evaluate.py runs/ltd-cifar100-wrn-34-10/best.pt --preset standard --diagnose
    torchrun --nproc_per_node 4 ltd.py --dataset cifar100 --batch-size 32    # 4 GPUs x 32; BatchNorm per GPU (--sync-bn: all 128)
Reusing the baseline as the teacher makes "baseline + LTD" cost two trainings instead of three.
Measured on a CPU (README, Results). Real MNIST at a small budget (10,000 training images, 4 epochs, eps 0.3,
1,000 test images, 3 seeds, mean +- sd): LTD 94.1 +- 0.2% clean / 13.5 +- 0.7% AA-lite vs TRADES-AWP
95.4 +- 0.3% / 7.5 +- 1.6%; LTD - TRADES-AWP +6.0 points, 95% t-interval over seeds [+2.7, +9.2]. At the
full MNIST defaults (all training images, 10 epochs, one seed, 1,000 test images) the gap is gone: LTD 98.6% /
90.7% AA-lite vs TRADES-AWP 98.9% / 90.9% (official AutoAttack: 90.9%), -0.2 points, sign test p = 0.81.
CIFAR-10 (JPEG copy), wrn-16-1, 10,000 images x 4 epochs, one seed, eps 8/255, 1,000 test images: LTD 31.6%
clean / 19.6% AA-lite vs its TRADES-AWP teacher 37.5% / 20.2%: -0.6 points robust (sign test p = 0.6), -5.9 clean.

Fidelity (legend in README.md, 'Fidelity'): the paper body was not available, only its abstracts.
  [C] (abstracts): soft labels from a teacher through a temperature softmax; the teacher temperature is
    "relatively low"; tau_t and tau_s are fixed; tau_s is kept at inference (checkpoint `temperature` =
    tau_s). v1-v3 (2021-2023) and the TMLR submission say the two are "different, but fixed"; v4 (Nov
    2025) drops "different". We follow v4: tau_t == tau_s trains, with a one-line note in the log. The
    CIFAR-10 AutoAttack logs of the released models name the TRADES-AWP code.
  [R] ours, each open choice a flag:
    * the base recipe is the TRADES-AWP code's ([C] for that code, [R] that LTD kept it):
      WRN-34-10, 200 epochs, SGD lr 0.1 momentum 0.9 wd 5e-4, batch 128, lr x0.1 from the 100th epoch and
      x0.01 from the 150th (its 1-based `epoch >= 100`; --milestones counts epochs done: 99 149), the KL
      attack with 10 steps of 2/255 in eps 8/255, first gradient at x + 0.001 N(0,1) (unclamped), eval mode,
      beta = 6, AWP gamma 5e-3 from epoch 10 on conv/fc weights. The CIFAR-100 log does not name that
      code, so the lineage of the CIFAR-100 model (our default command) is [U].
    * the loss above: p_t replaces y in the natural term, the teacher sees clean x, and the student is
      divided by tau_s in the loss, the attack and the AWP step. Alternatives: --soft-on
      adversarial|both (p_t replaces softmax(z(x)) as the KL target) and --teacher-input adv.
    * tau_t = 0.5, tau_s = 2 are ours: the values are [U]. tau_t < 1 sharpens an adversarially trained
      teacher's under-confident outputs (a natural teacher at a few units is the other reading of
      "relatively low").
    * the teacher: who it is is [U]. We use TRADES(-AWP) with the student's arch (--teacher-arch,
      --teacher-epochs), or any checkpoint of this project via --teacher.
    * best checkpoint chosen by validation PGD-10 accuracy at temperature tau_s (the metric is [U]).
  [R] implementation: the weights are restored before opt.step() (the AWP code subtracts v after the
    step: only weight decay differs, seeing w, not w + v); the proxy's SGD step size cancels in the
    layer-wise normalisation and is not used. Forward order as the references (BatchNorm sees adv, clean,
    clean for TRADES-AWP; clean, adv, clean for TRADES): with dropout, two clean forwards with gradient;
    without, one, plus a no-grad clean forward in train mode for the BatchNorm statistics.
"""
import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------------------------
# The method. All of LTD's maths is in ltd_outer_loss (on given logits) and ltd_loss (model forward).
# ----------------------------------------------------------------------------------------------
def ltd_outer_loss(z_nat, z_adv, y, beta=6.0, soft=None, soft_on="natural", z_kl=None):
    """TRADES / LTD outer loss on logits already divided by tau_s.

    natural term: CE(z_nat, y), or with teacher soft labels `soft` -sum_k soft_k log softmax(z_nat)_k;
    robust term:  beta * KL(q || softmax(z_adv)), q = softmax(z_kl) (TRADES; z_kl = z_nat unless given), or
                  q = soft with soft_on 'adversarial' / 'both'. One-hot `soft` (soft_on natural), tau_s = 1: TRADES.
    """
    logp_nat, logp_adv = F.log_softmax(z_nat.float(), 1), F.log_softmax(z_adv.float(), 1)
    use_nat = soft is not None and soft_on in ("natural", "both")
    use_adv = soft is not None and soft_on in ("adversarial", "both")
    natural = -(soft * logp_nat).sum(1).mean() if use_nat else F.nll_loss(logp_nat, y)
    # TRADES keeps the gradient through the clean target softmax(z(x)): it pulls x and x_adv together.
    target = soft if use_adv else (logp_nat.exp() if z_kl is None else F.softmax(z_kl.float(), 1))
    robust = F.kl_div(logp_adv, target, reduction="batchmean")  # sum_k q_k (log q_k - log p_adv_k), mean over batch
    return natural + beta * robust


def has_active_dropout(model):
    """True when a forward of `model` is random: a dropout layer with p > 0 in train mode."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in model.modules())


def ltd_loss(model, x, x_adv, y, beta=6.0, tau_s=1.0, soft=None, soft_on="natural", bn_order="trades-awp"):
    """Drop-in training loss: (loss, adversarial logits). The model is in train mode; x_adv comes from trades_attack.

    The references run two train-mode clean forwards, one for the natural term and one for the KL target. With
    dropout active (papernot-mnist) they differ (two masks), so we run both with gradient, as the references do.
    Without dropout they are equal: one serves both terms and the repeated clean forward (bn_order) runs without
    gradient, only to give BatchNorm the references' running-statistics updates; the loss is the same.
    bn_order, the train-mode forward order: 'trades-awp' adv, clean (KL target), clean (natural term), as the
    TRADES-AWP code; 'trades' clean (natural), adv, clean (KL target), as the TRADES code; None (the AWP proxy's
    loss, whose statistics are discarded): clean, adv, and the KL target's clean forward only under dropout.
    """
    dropout = has_active_dropout(model)
    z = lambda v: model(v).float() / tau_s  # divide in float32, not in bf16 under autocast
    if bn_order == "trades-awp":
        z_adv, z_first = z(x_adv), z(x)  # the first clean forward is the KL target's
        z_nat, z_kl = (z(x), z_first) if dropout else (z_first, None)
    else:
        z_nat, z_adv = z(x), z(x_adv)
        z_kl = z(x) if dropout else None  # None: the KL target is softmax(z_nat)
    if bn_order is not None and not dropout:
        with torch.no_grad():
            model(x)  # the references' second clean forward: one more update of the running statistics
    return ltd_outer_loss(z_nat, z_adv, y, beta, soft, soft_on, z_kl), z_adv


def trades_attack(model, x, eps, alpha, steps, tau_s=1.0):
    """TRADES inner maximisation of KL(softmax(z(x)) || softmax(z(x'))), z = f / tau_s, in eval mode."""
    was_training = model.training
    model.eval()  # BN in eval mode: the attack reads the network without changing its statistics
    with torch.no_grad():
        p_nat = F.softmax(model(x).float() / tau_s, 1)
    x_adv = common.pgd(lambda v: model(v).float() / tau_s, x, None, eps, alpha, steps, loss="kl", target=p_nat,
                       random_start="normal")  # first gradient at x + 0.001 N(0, 1), unclamped, as the TRADES code
    model.train(was_training)
    return x_adv


@torch.no_grad()
def teacher_soft_labels(teacher, x, tau_t):
    """p_t = softmax(f_T(x) / tau_t) from a frozen teacher in eval mode (its own .temperature must be 1). The
    teacher runs in float32 even inside the student's bf16 autocast: at tau_t = 0.5 bf16 logits' rounding doubles."""
    assert not teacher.training, "the teacher must be in eval mode (train mode would update its BN statistics)"
    with torch.autocast(x.device.type, enabled=False):
        return F.softmax(teacher(x).float() / tau_t, 1)


def awp_perturb(model, proxy, loss_fn, gamma):
    """AWP step: move each weight tensor (dim > 1) by gamma * |w| * g / |g|, g = d loss_fn / dw.

    The gradient is taken on `proxy` (a copy of the model), so the model's BN statistics are untouched.
    Returns a copy of the original weights for awp_restore. Under torchrun the proxy grads are averaged.
    """
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    proxy.zero_grad(set_to_none=True)
    loss_fn(proxy).backward()  # ascent direction of the training loss (same loss, same x_adv, same soft labels)
    common.average_gradients(proxy)
    saved, grads = {}, dict(proxy.named_parameters())
    with torch.no_grad():
        for name, w in model.named_parameters():
            g = grads[name].grad
            if w.dim() <= 1 or g is None:  # BN scales/shifts and biases stay put, as in the AWP code
                continue
            saved[name] = w.detach().clone()
            w.add_(g * (gamma * w.norm() / (g.norm() + 1e-20)))  # tensor maths: no GPU sync
    return saved


@torch.no_grad()
def awp_restore(model, saved):
    """Put back the weights awp_perturb saved (exactly; call it after backward, before opt.step())."""
    for name, w in model.named_parameters():
        if name in saved:
            w.copy_(saved[name])


# ----------------------------------------------------------------------------------------------
# Command line and training loop
# ----------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = common.base_parser("LTD (Chen & Lee, arXiv:2111.02331) on TRADES-AWP; --no-distill: the TRADES(-AWP) "
                           "baseline", arch="wrn-34-10", epochs=200,
                           # MNIST: TRADES's own MNIST beta; AWP from epoch 2, after the eps ramp
                           per_dataset={"mnist": dict(beta=1.0, awp_warmup=2)},
                           milestones=[99, 149])  # the TRADES-AWP code's decay from its 100th and 150th epoch
    p.add_argument("--tau-t", type=float, default=0.5,
                   help="teacher temperature, 'relatively low' (value ours); may equal --tau-s (paper v4) or be "
                        "larger or smaller, sweeps allowed; ignored with --no-distill")
    p.add_argument("--tau-s", type=float, default=2.0, help="student temperature in training, attack, AWP and "
                   "deployment (value ours); ignored with --no-distill (tau_s = 1)")
    p.add_argument("--soft-on", default="natural", choices=["natural", "adversarial", "both"],
                   help="terms whose target is the teacher's soft label (ours; open in the paper)")
    p.add_argument("--teacher-input", default="clean", choices=["clean", "adv"],
                   help="teacher labels computed on x or on the student's x_adv (ours; open in the paper)")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES weight of the KL term")
    p.add_argument("--awp", action=argparse.BooleanOptionalAction, default=True,
                   help="adversarial weight perturbation (the TRADES-AWP code the CIFAR-10 LTD models came from)")
    p.add_argument("--awp-gamma", type=float, default=5e-3, help="AWP size relative to each layer's norm")
    p.add_argument("--awp-warmup", type=int, default=None, help="first epoch (1-based) with AWP (None: 10, the AWP "
                   "code's, or half of --epochs when that is fewer, so AWP is on in every run)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: train TRADES(-AWP) first)")
    p.add_argument("--teacher-arch", default=None, help="arch of the teacher trained here (default: --arch)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: --epochs)")
    p.add_argument("--no-distill", action="store_true",
                   help="plain TRADES(-AWP): one-hot labels, tau_s = 1; --tau-t/-s, --soft-on, "
                        "--teacher-input/-arch/-epochs are then ignored")
    args = p.parse_args(argv)
    if args.awp_warmup is None:  # the AWP code's 10 of 200 epochs; a short run has AWP on from its middle epoch
        args.awp_warmup = min(10, max(1, args.epochs // 2))
    if not args.no_distill and (args.tau_t <= 0 or args.tau_s <= 0):
        raise common.UserError(f"--tau-t and --tau-s must be > 0 (got {args.tau_t}, {args.tau_s})")
    if args.beta < 0 or args.awp_gamma < 0:
        raise common.UserError("--beta and --awp-gamma must be >= 0")
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        raise common.UserError("--teacher-epochs must be >= 1")
    if args.no_distill and args.teacher:
        raise common.UserError("--teacher has no use with --no-distill (the baseline trains without a teacher)")
    return args


def train_stage(run, model, method, out_dir, epochs, tau_s=1.0, teacher=None, stage=None):
    """TRADES(-AWP) training of `model`; with a teacher, LTD. Returns the path of best.pt."""
    a = run.args
    train_model = run.prepare(model)
    opt, sched = run.optimizer(model.parameters(), epochs=epochs)
    proxy = copy.deepcopy(model) if a.awp and a.awp_gamma > 0 else None
    bn_order = "trades-awp" if proxy is not None else "trades"  # the reference code's forward order
    trainer = common.Trainer(run, model, opt, sched, method, out_dir=out_dir, epochs=epochs, temperature=tau_s,
                             stage=stage)
    for epoch in trainer.epochs_to_run():
        run.train_loader.set_epoch(epoch)
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for i, (x, y) in enumerate(run.train_loader):
            eps, alpha = run.eps_at(epoch, i)  # --eps-warmup ramp (MNIST default), else a.eps/a.alpha
            with run.autocast():
                x_adv = trades_attack(train_model, x, eps, alpha, a.steps, tau_s)
                soft = None if teacher is None else teacher_soft_labels(
                    teacher, x if a.teacher_input == "clean" else x_adv, a.tau_t)

            def loss_fn(net, bn_order=None):
                with run.autocast():
                    return ltd_loss(net, x, x_adv, y, a.beta, tau_s, soft, a.soft_on, bn_order)

            saved = None
            if proxy is not None and epoch + 1 >= a.awp_warmup:
                saved = awp_perturb(model, proxy, lambda net: loss_fn(net)[0], a.awp_gamma)
            loss, logits = loss_fn(train_model, bn_order)  # at w + v when AWP is on
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if saved is not None:
                awp_restore(model, saved)  # w <- w - lr * grad L(w + v)
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()  # accuracy on x_adv, as the AWP code logs it
            seen += len(y)
        trainer.end_epoch(epoch, loss_sum, correct, seen, t0)
    return trainer.finish()


def main(argv=None):
    args = get_args(argv)
    base = "trades-awp" if args.awp and args.awp_gamma > 0 else "trades"
    if base == "trades":  # recorded in every checkpoint's args: this is not TRADES's own recipe
        args.recipe = "TRADES loss with the TRADES-AWP schedule (no AWP)"
    run = common.Run(args, base if args.no_distill else "ltd")
    if run.main and base == "trades-awp" and args.awp_warmup > args.epochs:
        print(f"note: --awp-warmup {args.awp_warmup} > --epochs {args.epochs}: AWP is never on in this run", flush=True)
    if run.main and base == "trades":
        print(f"note: {args.recipe}: {args.epochs} epochs, wd {args.weight_decay:g}, lr x{args.gamma:g} after "
              f"epochs {args.milestones}; TRADES's own is 76 epochs, wd 2e-4, attack step 0.007, decays after 74/89/99")
    if run.main and not args.no_distill and args.tau_t == args.tau_s:
        print("note: tau_t == tau_s; allowed since the paper's v4 (2025), whose abstract no longer says 'different'")
    if args.no_distill:
        return run.done(train_stage(run, run.model(), base, args.out_dir, args.epochs))
    path = args.teacher
    if path is None:
        path = train_stage(run, run.model(args.teacher_arch), base, os.path.join(args.out_dir, "teacher"),
                           args.teacher_epochs or args.epochs, stage="1/2 (teacher)")
    teacher = common.load_teacher(path, run)  # frozen, eval, temperature 1
    return run.done(train_stage(run, run.model(), "ltd", args.out_dir, args.epochs, args.tau_s, teacher,
                                stage=None if args.teacher else "2/2 (student)"))


if __name__ == "__main__":
    common.run_main(main)
