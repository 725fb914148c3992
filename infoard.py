"""InfoARD: adversarial robustness distillation with attack-strength adaptation and mutual-information maximisation.

Paper: "InfoARD: Enhancing Adversarial Robustness Distillation with Attack-Strength Adaptation and
Mutual-Information Maximization", Ruihan Liu, Jieyi Cai, Yishu Liu, Sudong Cai, Bingzhi Chen, Yulan Guo,
Mohammed Bennamoun. IEEE Transactions on Image Processing, 2025, doi 10.1109/TIP.2025.3637689 (no arXiv id).

Idea. A robust teacher T (e.g. a PGD-AT WRN-34-10) is distilled into a small student S on adversarial
examples, as in RSLAD. The abstract names two problems of adversarial distillation, a fixed attack strength
and "attention region shift", and answers them with ASA (attack-strength adaptation) + MIM
(mutual-information maximisation). Our reconstruction [P]: ASA replaces the one eps of every image by a
per-image budget, larger where the teacher is confident (its soft label is reliable far from x) and smaller
where it is not; MIM pulls, besides the logits, the student's pooled features and its attention maps towards
the teacher's. With p_T = softmax(T(x)), x' the ASA adversarial example:

  ASA   eps_i = clip(eps0 (0.5 + p_T(y_i | x_i)), lo, hi)  in [4/255, 12/255],   alpha_i = eps_i / 4,
        x'_i  = PGD_10 maximising KL(T(x_i) || S(x'_i)) in the ball ||x'_i - x_i||_inf <= eps_i
  L   = w_kl  [ 5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)) ]                 (RSLAD form, batchmean)
      + w_nce InfoNCE(g_s(z_S(x')), g_t(z_T(x)); tau)                              (I(z_S; z_T) >= log B - L_nce)
      + w_at  sum_{l=1..3} mean (a(S_l(x')) - a(T_l(x)))^2,  a(f) = normalise(vec(mean_c f^2))

g_s, g_t are linear maps to 128-d, L2-normalised; they train with the student and are not deployed.
`--asa off --mim logit` is RSLAD's attack and loss (Zi et al., ICCV 2021): the baseline lives in this file.

Train and evaluate (CIFAR-10; without --teacher a PGD-AT WRN-34-10 teacher is trained first, into
<out-dir>/teacher/best.pt; reuse it for the baseline so both students share one teacher):
  python infoard.py --dataset cifar10                                  # -> runs/infoard-cifar10-resnet18/best.pt
  python infoard.py --dataset cifar10 --asa off --mim logit --w-kl 0.1 --teacher runs/infoard-cifar10-resnet18/teacher/best.pt
  python evaluate.py runs/infoard-cifar10-resnet18/best.pt --preset standard --diagnose
  python evaluate.py runs/rslad-cifar10-resnet18/best.pt --preset standard --diagnose
The baseline above is RSLAD at its own loss scale (w_kl 0.1 = its B*C mean; 200 epochs, not its 300). To
measure what ASA + MIM add, both arms need the same KL scale: also run the baseline without --w-kl 0.1
(w_kl 1, as InfoARD) under another --out-dir, and compare InfoARD with that one.
Options: --arch mobilenetv2 (student); --teacher any checkpoint of this repo; --asa search; --inner adaad.

Fidelity ([C] primary source, [A] abstract, [S] secondary, [P] our proposal; § = our research notes).
The paper's full text and code were not available to us.
  Confirmed [C/A]: title, authors, venue; that fixed attack strength and attention region shift are the two
    problems and ASA + MIM the answer (abstract only). Secondary [S, low trust]: that ASA adapts the
    strength per instance (an AI-written summary of the paper).
  Confirmed baseline [C]: RSLAD's inner loss, its 5/6-1/6 outer KL at temperature 1 and its 0.001 N(0,1)
    start; the training protocol SGD 0.1, momentum 0.9, wd 2e-4 (RSLAD/ARD/IAD; AdaAD 5e-4), batch 128
    (ARD: 256 on CIFAR-100), eps 8/255, 10 x 2/255, with ARD/IAD/AdaAD's 200 epochs and x0.1 at 100/150
    (RSLAD itself ran 300 epochs).
  Reconstructed, ours [P, §2]: every InfoARD rule and constant. The confidence rule for eps_i and its range,
    alpha_i = eps_i/4; the batch-local `--asa search` (below); the RSLAD inner loss as default (the notes
    proposed AdaAD's: `--inner adaad`); reading MIM as feature + attention terms against attention region
    shift; InfoNCE with in-batch negatives (per rank under torchrun: B/world of them), symmetric, tau 0.07
    (CRD's value), 128-d linear heads; Attention Transfer on the first three stage maps with weight 1000
    (RepDistiller's); w_kl = w_nce = 1; the PGD-AT teacher when none is given; best.pt by val PGD-10; KL
    with `batchmean` throughout. RSLAD's code averages its KL over B*C (x10 on CIFAR-100), i.e. batchmean/10
    on both datasets: `--w-kl 0.1` reproduces its exact loss scale (§6).
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


##############################################################################################
#                          ASA: per-sample attack strength (all [P])                         #
##############################################################################################
def asa_eps(teacher_probs_true, eps0, lo, hi):
    """eps_i = eps0 (0.5 + p_T(y_i|x_i)) clipped to [lo, hi]: monotone in the teacher's confidence.

    A confident teacher's soft label is trustworthy further from x, so the student is attacked harder
    there; where the teacher is unsure (its label is a poor target under a big perturbation) less so.
    """
    return (eps0 * (0.5 + teacher_probs_true)).clamp(lo, hi)


def asa_attack(student, teacher, x, y, t_logits, eps, alpha, steps, asa="conf", inner="rslad", eps_range=None,
               gamma=1.9 / 255):
    """Inner maximisation with a per-sample budget; returns (x_adv, eps_i). Student in eval mode meanwhile.

    asa:   'conf' eps_i from asa_eps; 'off' eps_i = eps; 'search' a batch-local version of instance-adaptive
           AT (Balaji et al. 2019): attack at eps_i - gamma, eps_i, eps_i + gamma (clipped to the range) around
           the 'conf' start and keep, per sample, the largest at which the student still predicts y (the
           smallest if it fails at all three). 3 attacks per batch; no per-index memory or EMA across epochs.
    inner: 'rslad' maximises KL(T(x) || S(x')), the adversarial term of the outer loss itself (one min-max
           objective; the teacher runs once per batch); 'adaad' maximises KL(T(x') || S(x')), where teacher
           and student disagree most, at the cost of a teacher forward+backward in every step.
    """
    lo, hi = eps_range or (0.5 * eps, 1.5 * eps)
    ratio = alpha / eps if eps > 0 else 0.0  # alpha_i = eps_i / 4 at the defaults 8/255, 2/255
    t_probs = F.softmax(t_logits.float(), 1)
    if asa == "off":
        eps_i = torch.full((len(x),), float(eps), device=x.device)
    else:
        eps_i = asa_eps(t_probs.gather(1, y[:, None]).squeeze(1), eps, lo, hi)

    def attack(e):
        if inner == "rslad":
            return common.pgd(student, x, y, e, e * ratio, steps, loss="kl", target=t_probs, random_start="normal")
        kl = lambda out, _: F.kl_div(F.log_softmax(out[0].float(), 1), F.log_softmax(out[1].float(), 1),
                                     reduction="none", log_target=True).sum(1)
        return common.pgd(lambda z: (student(z), teacher(z)), x, y, e, e * ratio, steps, loss=kl, random_start="normal")

    was_training = student.training
    student.eval()  # frozen BN statistics while attacking (RSLAD/AdaAD code)
    if asa != "search":
        x_adv = attack(eps_i)
    else:
        x_adv, chosen = None, None
        for e in [(eps_i + d * gamma).clamp(lo, hi) for d in (-1, 0, 1)]:  # ascending: later wins ties
            xa = attack(e)
            if x_adv is None:
                x_adv, chosen = xa, e
                continue
            with torch.no_grad():
                ok = student(xa).argmax(1) == y
            x_adv, chosen = torch.where(ok[:, None, None, None], xa, x_adv), torch.where(ok, e, chosen)
        eps_i = chosen
    student.train(was_training)
    return x_adv, eps_i


##############################################################################################
#                         MIM: logit, feature and attention terms                            #
##############################################################################################
def kl_div(target_logits, logits):
    """KL(softmax(target) || softmax(logits)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), 1), F.log_softmax(target_logits.float(), 1),
                    reduction="batchmean", log_target=True)


def rslad_kl(t_clean_logits, s_adv_logits, s_clean_logits):
    """RSLAD's outer loss: 5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)); the teacher's clean soft label
    is the target for both the adversarial and the clean student output (no hard labels)."""
    return 5 / 6 * kl_div(t_clean_logits, s_adv_logits) + 1 / 6 * kl_div(t_clean_logits, s_clean_logits)


def info_nce(za, zb, tau=0.07, symmetric=True):
    """InfoNCE with in-batch negatives over L2-normalised (B, d) embeddings: row i of za must pick row i of zb.

    log B - loss lower-bounds the mutual information I(za; zb); it equals log B at chance. symmetric
    averages the za-anchored and zb-anchored directions (CLIP style).
    """
    logits = za.float() @ zb.float().t() / tau
    labels = torch.arange(len(za), device=za.device)
    loss = F.cross_entropy(logits, labels)
    return 0.5 * (loss + F.cross_entropy(logits.t(), labels)) if symmetric else loss


def attention_loss(s_stages, t_stages):
    """sum_l mean_{b,p} (a(S_l) - a(T_l))^2 with a = common.attention_map (Attention Transfer, Zagoruyko &
    Komodakis 2017); the larger of each pair of maps is pooled to the smaller size."""
    total = 0.0
    for fs, ft in zip(s_stages, t_stages):
        size = min(fs.shape[-2:], ft.shape[-2:], key=lambda s: s[0] * s[1])
        total = total + (common.attention_map(fs, size) - common.attention_map(ft, size)).pow(2).mean()
    return total


class ProjectionHeads(nn.Module):
    """g_s, g_t of the InfoNCE term: a linear map each into a shared `dim`-d space, L2-normalised.
    Trained with the student's optimizer; kept in last.pt (for --resume), never in the deployed best.pt.
    Call it outside autocast on float32 inputs (infoard_loss does): bf16 logits are too coarse at tau 0.07."""

    def __init__(self, s_dim, t_dim, dim=128):
        super().__init__()
        self.student, self.teacher = nn.Linear(s_dim, dim), nn.Linear(t_dim, dim)

    def forward(self, zs, zt):
        return F.normalize(self.student(zs), dim=1), F.normalize(self.teacher(zt), dim=1)


def infoard_loss(student, teacher, heads, x, y, eps=8 / 255, alpha=2 / 255, steps=10, asa="conf", inner="rslad",
                 eps_range=None, gamma=1.9 / 255, w_kl=1.0, w_nce=1.0, w_at=1000.0, tau=0.07, at_stages=(0, 1, 2)):
    """ASA attack + MIM loss for one batch; returns (loss, student logits on x'). The caller keeps the teacher
    in eval mode; it gets no gradient from here. The student ends in the mode it came in; heads may be None
    if w_nce = 0."""
    assert not teacher.training, "teacher must be in eval mode (train mode updates its BN statistics)"
    with torch.no_grad():
        t_logits, t_feats = teacher(x, return_features=True)
    x_adv, _ = asa_attack(student, teacher, x, y, t_logits, eps, alpha, steps, asa, inner, eps_range, gamma)
    s_adv, s_feats = student(x_adv, return_features=True)
    loss = w_kl * rslad_kl(t_logits, s_adv, student(x))
    if w_nce:  # feature level: adversarial student <-> clean teacher, other images of the batch as negatives
        with torch.autocast(x.device.type, enabled=False):  # fp32 heads and similarities (tau 0.07)
            zs, zt = heads(s_feats["pooled"].float(), t_feats["pooled"].float())
            loss = loss + w_nce * info_nce(zs, zt, tau)
    if w_at:  # attention level: where the adversarial student looks <-> where the clean teacher looks
        pick = lambda stages: [stages[i] for i in at_stages]
        loss = loss + w_at * attention_loss(pick(s_feats["stages"]), pick(t_feats["stages"]))
    return loss, s_adv.detach()


##############################################################################################
#                                     Script plumbing                                        #
##############################################################################################
MIM = {"logit": (0, 0), "logit+feature": (1, 0), "logit+attention": (0, 1), "all": (1, 1)}  # (InfoNCE on, AT on)


def get_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], epochs=200, weight_decay=2e-4,
                           per_dataset={"mnist": dict(teacher_arch="papernot-mnist", at_stages=[0, 1])})
    p.add_argument("--teacher", default=None, help="robust teacher checkpoint; without it a PGD-AT teacher is trained first")
    p.add_argument("--teacher-arch", default="wrn-34-10", help="arch of the teacher trained when --teacher is absent")
    p.add_argument("--teacher-epochs", type=int, default=None, help="epochs of that teacher (None: --epochs)")
    p.add_argument("--asa", default="conf", choices=["conf", "search", "off"], help="attack-strength adaptation (ours)")
    p.add_argument("--asa-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="clip of eps_i (None: 0.5 eps, 1.5 eps, i.e. 4/255, 12/255) (ours)")
    p.add_argument("--asa-gamma", type=float, default=1.9 / 255, help="--asa search step (1.9/255, IAAT's value)")
    p.add_argument("--inner", default="rslad", choices=["rslad", "adaad"],
                   help="attack objective: KL(T(x)||S(x')) or KL(T(x')||S(x')) (ours: rslad)")
    p.add_argument("--mim", default="all", choices=list(MIM), help="which MIM terms are on (logit = RSLAD's loss)")
    p.add_argument("--w-kl", type=float, default=1.0, help="weight of the RSLAD-form KL (ours; 0.1 = RSLAD's exact scale)")
    p.add_argument("--w-nce", type=float, default=1.0, help="weight of the feature InfoNCE (ours)")
    p.add_argument("--w-at", type=float, default=1000.0, help="weight of Attention Transfer (ours, RepDistiller's)")
    p.add_argument("--nce-tau", type=float, default=0.07, help="InfoNCE temperature (ours, CRD's)")
    p.add_argument("--nce-dim", type=int, default=128, help="projection-head output size (ours, CRD's)")
    p.add_argument("--at-stages", type=int, nargs="+", default=[0, 1, 2],
                   help="indices of the stage maps paired by Attention Transfer, same for both models (ours)")
    args = p.parse_args(argv)
    args.teacher_epochs = args.epochs if args.teacher_epochs is None else args.teacher_epochs
    use_nce, use_at = MIM[args.mim]
    args.w_nce, args.w_at = args.w_nce * use_nce, args.w_at * use_at
    if args.nce_tau <= 0 or args.nce_dim < 1 or args.asa_gamma < 0:
        raise common.UserError("--nce-tau and --nce-dim must be positive and --asa-gamma >= 0")
    if args.asa_range is not None and not 0 <= args.asa_range[0] <= args.asa_range[1]:
        raise common.UserError(f"--asa-range needs 0 <= LO <= HI, got {args.asa_range}")
    return args


def train_teacher(run):
    """Stage 1 when no --teacher is given: a PGD-AT (Madry et al. 2018) teacher in <out-dir>/teacher."""
    a = run.args
    model = run.model(a.teacher_arch)
    train_model = run.prepare(model)
    opt, sched = run.optimizer(model.parameters(), epochs=a.teacher_epochs)
    trainer = common.Trainer(run, model, opt, sched, "pgd-at", out_dir=os.path.join(a.out_dir, "teacher"),
                             epochs=a.teacher_epochs)
    for epoch in trainer.epochs_to_run():
        run.train_loader.set_epoch(epoch)
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for i, (x, y) in enumerate(run.train_loader):
            eps, alpha = run.eps_at(epoch, i)  # --eps-warmup ramp (MNIST default), else a.eps/a.alpha
            with run.autocast():
                model.eval()
                x_adv = common.pgd(train_model, x, y, eps, alpha, a.steps)
                model.train()
                logits = train_model(x_adv)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, correct, seen = loss_sum + loss.detach() * len(y), correct + (logits.argmax(1) == y).sum(), seen + len(y)
        trainer.end_epoch(epoch, loss_sum, correct, seen, t0)
    return trainer.finish()


def main(argv=None):
    args = get_args(argv)
    method = "rslad" if (args.asa, args.mim, args.inner) == ("off", "logit", "rslad") else "infoard"
    run = common.Run(args, method)
    # frozen, eval mode, temperature 1 (RSLAD/AdaAD distil from raw logits), same dataset checked
    teacher = common.load_teacher(args.teacher or train_teacher(run), run)
    student = run.model()
    (n_s, d_s) = common.feature_shape(student, run.info, run.device)
    (n_t, d_t) = common.feature_shape(teacher, run.info, run.device)
    if args.w_at and not all(0 <= i < min(n_s, n_t) for i in args.at_stages):
        raise common.UserError(f"--at-stages {args.at_stages}: student has {n_s} stage maps, teacher {n_t}")
    heads = ProjectionHeads(d_s, d_t, args.nce_dim).to(run.device) if args.w_nce else None
    train_model = run.prepare(student)
    opt, sched = run.optimizer(list(student.parameters()) + (list(heads.parameters()) if heads else []))
    trainer = common.Trainer(run, student, opt, sched, method, temperature=1.0,
                             extra_state={"heads": heads} if heads else None)
    cfg = dict(eps=args.eps, alpha=args.alpha, steps=args.steps, asa=args.asa, inner=args.inner,
               eps_range=args.asa_range, gamma=args.asa_gamma, w_kl=args.w_kl, w_nce=args.w_nce,
               w_at=args.w_at, tau=args.nce_tau, at_stages=args.at_stages)
    for epoch in trainer.epochs_to_run():
        run.train_loader.set_epoch(epoch)
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for i, (x, y) in enumerate(run.train_loader):
            cfg["eps"], cfg["alpha"] = run.eps_at(epoch, i)  # --eps-warmup ramp (MNIST default)
            with run.autocast():
                loss, logits = infoard_loss(train_model, teacher, heads, x, y, **cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if heads is not None:
                common.average_gradients(heads)  # DDP syncs the student only
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        trainer.end_epoch(epoch, loss_sum, correct, seen, t0)
    return trainer.finish()


if __name__ == "__main__":
    common.run_main(main)
