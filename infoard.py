"""InfoARD: adversarial robustness distillation with attack-strength adaptation and mutual-information maximisation.

Paper: "InfoARD: Enhancing Adversarial Robustness Distillation with Attack-Strength Adaptation and
Mutual-Information Maximization", Ruihan Liu, Jieyi Cai, Yishu Liu, Sudong Cai, Bingzhi Chen, Yulan Guo,
Mohammed Bennamoun. IEEE Transactions on Image Processing, 2025, doi 10.1109/TIP.2025.3637689 (no arXiv id).

Idea. A robust teacher T is distilled into a small student S on adversarial examples, as in RSLAD. The
abstract names two problems of adversarial distillation, a fixed attack strength and "attention region
shift", and answers them with ASA (attack-strength adaptation) + MIM (mutual-information maximisation).
Our reconstruction [R]: ASA gives every training image its own budget eps_i, remembered across epochs and
moved by how the student copes with it; MIM pulls, besides the logits, the student's pooled features and its
attention maps towards the teacher's. With p_T = softmax(T(x)), x' the ASA adversarial example:

  ASA   per image i a strength eps_i, kept across epochs (eps0 in the first --asa-warmup epochs). On each
        visit, with e = eps_i clipped to [lo, hi] = [eps0/2, 3 eps0/2] and gamma = eps0 x 1.9/8:
          up   = S still predicts y on x'(min(e + gamma, hi))          (a probe attack)
          down = not up, and S errs on x'(e)                          (the training attack, reused)
          eps_i <- beta clip(e + gamma (up - down), lo, hi) + (1 - beta) e;   the batch trains on x'(e)
        x'(e) = PGD_10 (step e/4) maximising KL(T(x) || S(x')) in ||x' - x||_inf <= e, S in eval mode
  L   = w_kl  [ 5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)) ]                 (RSLAD form, batchmean)
      + w_nce InfoNCE(g_s(z_S(x')), g_t(z_T(x)); tau)                              (I(z_S; z_T) >= log B - L_nce)
      + w_at  sum_{l=1..3} mean (a(S_l(x')) - a(T_l(x)))^2,  a(f) = normalise(vec(mean_c f^2))

g_s, g_t: linear maps to 128-d, L2-normalised, trained with S, not deployed. `--asa conf` is a
teacher-confidence rule instead: eps_i = clip(eps0 (0.5 + p_T(y|x)), lo, hi).
RSLAD mode, `--asa off --mim logit` (--inner rslad), is RSLAD's attack and loss (Zi et al., ICCV 2021) at its
KL scale, w_kl 0.1 by default; it is named `rslad` only at w_kl 0.1, else `rslad-like-wkl<w>`.

Train and evaluate (CIFAR-10). RSLAD distils from a TRADES teacher; ltd.py makes one. Both arms share it and
the KL scale (0.1, RSLAD's):
  python ltd.py --dataset cifar10 --no-distill --no-awp --out-dir runs/trades-c10   # TRADES WRN-34-10 teacher
  python infoard.py --dataset cifar10 --teacher runs/trades-c10/best.pt --w-kl 0.1  # -> runs/infoard-cifar10-resnet18
  python infoard.py --dataset cifar10 --teacher runs/trades-c10/best.pt --asa off --mim logit   # -> runs/rslad-...
  python evaluate.py runs/infoard-cifar10-resnet18/best.pt --preset standard --diagnose   # and the rslad one
Without --teacher a PGD-AT WRN-34-10 teacher is trained first, into <out-dir>/teacher. RSLAD ran 300 epochs,
we run 200. Options: --arch mobilenetv2 (student); --asa conf|off; --inner adaad; --w-kl 1 on both arms.

Fidelity (legend in README.md, 'Fidelity'): the paper's full text and code were not available to us.
  [C] (abstract): title, authors, venue; that fixed attack strength and attention region shift are the two
    problems and ASA + MIM the answer; that strength is tailored to "individual instances".
  [R] from a related paper, ICRL (Computer Engineering 51(1), 2025, two InfoARD authors): a strength per
    instance, updated as the student grows more robust. Hence the student-driven table is the default;
    the teacher-confidence rule is `--asa conf`.
  [C] baseline (RSLAD's official code): its inner loss, its 5/6-1/6 outer KL at temperature 1 and its
    0.001 N(0,1) start; its B*C-mean KL (x10 on CIFAR-100), i.e. batchmean/10 on both: w_kl 0.1 here; its
    TRADES WRN-34-10 teacher on CIFAR-10; SGD 0.1, momentum 0.9, wd 2e-4, batch 128, eps 8/255, 10 x 2/255, with
    ARD/IAD/AdaAD's 200 epochs and x0.1 after 100 and 150 epochs (ARD's 0-based count, as --milestones;
    RSLAD: 300 epochs, x0.1 after 215/260/285).
  [R] ours: every InfoARD rule and constant. The update rule (IAAT's up/down step, Balaji
    et al. 2019, with a per-sample memory), its cost (one probe attack at eps_i + gamma per batch besides the
    training attack, whose result gives "fails"), gamma = eps0 x 1.9/8 (IAAT's 1.9/255 at 8/255), 10 warm-up
    epochs (half of --epochs in shorter runs; 2 on MNIST), the range [eps0/2, 3 eps0/2], alpha_i = eps_i/4; the RSLAD inner loss as default
    (AdaAD's: `--inner adaad`); MIM as feature + attention terms; InfoNCE with in-batch
    negatives (per rank under torchrun: B/world of them), symmetric, tau 0.07 (CRD's), 128-d heads; Attention
    Transfer on the first three stage maps, weight 1000 (RepDistiller's); w_kl = w_nce = 1 outside RSLAD mode
    (KL `batchmean`); the PGD-AT teacher when none is given; best.pt by val PGD-10.
  ASA against IAAT (Balaji et al. 2019, official trainers/trainer_adaptive.py), whose up/stay/down decision it
    is. IAAT also: averages, beta 0.1 (--asa-beta; our default 1 is the whole move); sets the target to 0 for
    images S misclassifies clean (ours: the floor lo; --asa-zero-misclassified); trains the batch at the new
    eps_i after a third attack (ours: at the next visit; --asa-apply now); decides on CE attacks with S in train
    mode (ours: the training attack, eval mode, so it serves twice; --asa-probe ce); has no upper bound, attack
    step max(e/5, 2/255), and writes eps0 x [S right on x] into the memory during warm-up (ours: hi, e/4, eps0).
    The bounds follow the --eps-warmup ramp (--asa conf); --asa instance needs --asa-warmup >= --eps-warmup.
  Why beta 1 (measured, real MNIST, 10,000 training images, 4 epochs = 2 after the warm-up, one TRADES-AWP
    teacher, w_kl 0.1, seed 0; AA-lite at eps 0.3 on the same 500 test images): ours 92.2% clean / 18.2% [15.1,
    21.8] AA-lite (91/500), table mean 65.4/255 (10th-90th percentile 40.2-94.7) after the last epoch;
    --asa-beta 0.1: 92.4% / 15.6% [12.7, 19.0] (78/500), table 75.1 (72.9-78.3), barely off eps0 = 76.5 after
    two visits per image; all four IAAT options: 92.4% / 13.6% [10.9, 16.9] (68/500), table 72.7 (67.0-78.3).
    Per image, 15 and 23 images are robust for ours only, 2 and 0 the other way (sign tests p = 0.002 and 2e-7:
    test-image noise, not seed noise; one seed). At the papers' 200 epochs each image is visited ~190 times and
    beta 0.1 can settle; that comparison is not measured.
Measured on a CPU: real MNIST, small budget (tests/reproduce.py's MNIST command in the README; 10,000 training
images, 4 epochs, eps 0.3, 1,000 test images, 3 seeds, mean +- sd): InfoARD 92.8 +- 0.5% clean / 18.1 +- 0.9% AA-lite,
RSLAD 93.2 +- 0.6% / 16.6 +- 1.3%, each seed's one TRADES-AWP teacher, both at w_kl 0.1; InfoARD - RSLAD +1.5 points,
95% t-interval over seeds [-3.9, +6.9]: not distinguishable from zero at this budget. CIFAR-10 (JPEG copy),
wrn-16-1, 10,000 images x 4 epochs, one seed, its TRADES-AWP teacher 37.5% clean / 20.2% AA-lite: RSLAD 24.5% /
7.6% (its loss stays near 0.01-0.02: a flat teacher at w_kl 0.1 gives small gradients), InfoARD 34.4% / 20.3%:
+12.7 points AA-lite over RSLAD (sign test p = 3e-26).
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

import common


##############################################################################################
#                          ASA: per-sample attack strength (all [R])                         #
##############################################################################################
def asa_eps(teacher_probs_true, eps0, lo, hi):
    """--asa conf: eps_i = eps0 (0.5 + p_T(y_i|x_i)) clipped to [lo, hi]; a confident teacher's soft label is
    trusted further from x, so the student is attacked harder there."""
    return (eps0 * (0.5 + teacher_probs_true)).clamp(lo, hi)


def float32(model, x, **kw):
    """model(x) with autocast off: the teacher's logits and features stay float32 inside the student's bf16."""
    with torch.autocast(x.device.type, enabled=False):
        return model(x, **kw)


def asa_instance_rule(student, x, y, e, attack, gamma, lo, hi, beta=1.0, zero_wrong=False, x_cur=None):
    """One visit of --asa instance for a batch at strengths e (B,): returns its new table rows (see the docstring).

    attack(eps) -> x' is the decision attack; x_cur an attack at e already run (the training attack, reused).
    The student decides in the mode it is in.
    """
    x_cur = attack(e) if x_cur is None else x_cur
    x_up = attack((e + gamma).clamp(lo, hi))  # the probe one step up
    with torch.no_grad():
        up, fails = student(x_up).argmax(1) == y, student(x_cur).argmax(1) != y
        target = (e + gamma * (up.float() - (fails & ~up).float())).clamp(lo, hi)
        if zero_wrong:  # IAAT: no attack at all on images the student misclassifies clean
            target = target * (student(x).argmax(1) == y).float()
    return beta * target + (1 - beta) * e


def asa_attack(student, teacher, x, y, t_logits, eps, alpha, steps, asa="instance", inner="rslad", eps_range=None,
               gamma=1.9 / 255, eps_i=None, beta=1.0, zero_wrong=False, apply="next", probe="kl"):
    """Inner maximisation with a per-sample budget; returns (x_adv, eps_i used, new table rows or None).
    The student attacks in eval mode (a 'ce' probe: train mode) and ends in the mode it came in.

    asa:   'instance': eps_i = the batch's table rows, clipped to [lo, hi] ([0, hi] with zero_wrong), moved by
           asa_instance_rule [R]. apply 'next': the batch trains at the old eps_i, and its training attack is
           the rule's attack at eps_i (2 attacks per batch); 'now' (IAAT): decide first, then train the batch
           at the new eps_i (3 attacks). probe 'kl': the decision attacks are the training attack; 'ce' (IAAT):
           cross-entropy PGD (uniform start) with the student in train mode (3 attacks).
           'conf': eps_i from asa_eps; 'off': eps_i = eps.
    inner: 'rslad' maximises KL(T(x) || S(x')), the adversarial term of the outer loss itself (one min-max
           objective; the teacher runs once per batch); 'adaad' maximises KL(T(x') || S(x')), where teacher
           and student disagree most, at the cost of a teacher forward+backward in every step.
    """
    lo, hi = eps_range or (0.5 * eps, 1.5 * eps)
    ratio = alpha / eps if eps > 0 else 0.0  # alpha_i = eps_i / 4 at the defaults 8/255, 2/255
    t_probs = F.softmax(t_logits.float(), 1)
    if asa == "off":
        eps_i = torch.full((len(x),), float(eps), device=x.device)
    elif asa == "conf":
        eps_i = asa_eps(t_probs.gather(1, y[:, None]).squeeze(1), eps, lo, hi)
    elif eps_i is None:
        raise ValueError("asa='instance' needs eps_i, this batch's entries of the strength table")
    else:
        eps_i = eps_i.clamp(0.0 if zero_wrong else lo, hi)

    def attack(e):
        if inner == "rslad":
            return common.pgd(student, x, y, e, e * ratio, steps, loss="kl", target=t_probs, random_start="normal")
        kl = lambda out, _: F.kl_div(F.log_softmax(out[0].float(), 1), F.log_softmax(out[1].float(), 1),
                                     reduction="none", log_target=True).sum(1)
        return common.pgd(lambda z: (student(z), float32(teacher, z)), x, y, e, e * ratio, steps, loss=kl,
                          random_start="normal")

    was_training = student.training
    student.eval()  # frozen BN statistics while attacking (RSLAD/AdaAD code)
    x_cur, eps_next = None, None
    if asa == "instance":
        x_cur = attack(eps_i) if apply == "next" and probe == "kl" else None
        student.train(probe == "ce")  # IAAT attacks and decides in train mode
        decide = attack if probe == "kl" else lambda e: common.pgd(student, x, y, e, e * ratio, steps, loss="ce")
        eps_next = asa_instance_rule(student, x, y, eps_i, decide, gamma, lo, hi, beta, zero_wrong, x_cur)
        student.eval()
        eps_i = eps_next if apply == "now" else eps_i
    x_adv = x_cur if x_cur is not None else attack(eps_i)
    student.train(was_training)
    return x_adv, eps_i, eps_next


class StrengthTable(nn.Module):
    """eps_i of every training sample, kept across epochs; a buffer, so it travels in last.pt (--resume). Under
    torchrun each rank moves only its shard's rows; sync() adds up all ranks' moves (disjoint shards)."""

    def __init__(self, n, eps0):
        super().__init__()
        self.register_buffer("eps", torch.full((n,), float(eps0)))

    @torch.no_grad()
    def sync(self, start):
        if dist.is_initialized() and dist.get_world_size() > 1:
            moved = self.eps - start
            dist.all_reduce(moved)
            self.eps.copy_(start + moved)

    def stats(self):
        """mean, 10th and 90th percentile of eps_i, in units of 1/255 (for the epoch log line)."""
        q = torch.quantile(self.eps.float(), torch.tensor([0.1, 0.9], device=self.eps.device)) * 255
        return {"eps_i_mean_255": self.eps.mean().item() * 255, "eps_i_p10_255": q[0].item(), "eps_i_p90_255": q[1].item()}


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
    with torch.autocast(za.device.type, enabled=False):  # float32 similarities even inside autocast (tau 0.07)
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


def at_stage_indices(at_stages, n_s, n_t):
    """Stage maps paired by Attention Transfer: `at_stages` (checked against both models), or with None the
    first three both models have (all of them on a two-stage CNN)."""
    n = min(n_s, n_t)
    idx = list(range(min(3, n))) if at_stages is None else list(at_stages)
    if any(not 0 <= i < n for i in idx):
        raise ValueError(f"stage indices {idx}: the student has {n_s} stage maps, the teacher {n_t}")
    return idx


def infoard_loss(student, teacher, heads, x, y, eps=8 / 255, alpha=2 / 255, steps=10, asa="instance", inner="rslad",
                 eps_range=None, gamma=1.9 / 255, w_kl=1.0, w_nce=1.0, w_at=1000.0, tau=0.07, at_stages=None,
                 table=None, idx=None, asa_options=None):
    """ASA attack + MIM loss for one batch (crafts its own x'); returns (loss, student logits on x'). The caller
    keeps the teacher in eval mode; it gets no gradient from here. The student ends in the mode it came in.

    Models map images in [0, 1] to logits; only with w_nce or w_at != 0 are they called as
    model(x, return_features=True) -> (logits, {"stages": [maps], "pooled": (B, d)}). heads (ProjectionHeads)
    may be None if w_nce = 0. at_stages: see at_stage_indices. asa='instance' moves `table` (a tensor of eps_i
    per training sample) in place at rows `idx` (the batch's sample indices); without a table it attacks at
    the fixed eps, as asa='off'. asa_options: asa_attack's beta, zero_wrong, apply, probe."""
    assert not teacher.training, "teacher must be in eval mode (train mode updates its BN statistics)"
    feats = bool(w_nce or w_at)  # feature terms on: both models must return their features
    forward = lambda net, v: net(v, return_features=True) if feats else (net(v), None)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # the teacher in float32
        t_logits, t_feats = forward(teacher, x)
    if asa == "instance" and table is None:
        asa = "off"
    eps_i = table[idx] if asa == "instance" else None
    x_adv, _, eps_next = asa_attack(student, teacher, x, y, t_logits, eps, alpha, steps, asa, inner, eps_range, gamma,
                                    eps_i, **(asa_options or {}))
    if eps_next is not None:
        table[idx] = eps_next
    s_adv, s_feats = forward(student, x_adv)
    loss = w_kl * rslad_kl(t_logits, s_adv, student(x))
    if w_nce:  # feature level: adversarial student <-> clean teacher, other images of the batch as negatives
        with torch.autocast(x.device.type, enabled=False):  # fp32 heads and similarities (tau 0.07)
            zs, zt = heads(s_feats["pooled"].float(), t_feats["pooled"].float())
            loss = loss + w_nce * info_nce(zs, zt, tau)
    if w_at:  # attention level: where the adversarial student looks <-> where the clean teacher looks
        pick = at_stage_indices(at_stages, len(s_feats["stages"]), len(t_feats["stages"]))
        loss = loss + w_at * attention_loss([s_feats["stages"][i] for i in pick], [t_feats["stages"][i] for i in pick])
    return loss, s_adv.detach()


##############################################################################################
#                                     Script plumbing                                        #
##############################################################################################
MIM = {"logit": (0, 0), "logit+feature": (1, 0), "logit+attention": (0, 1), "all": (1, 1)}  # (InfoNCE on, AT on)


def get_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], epochs=200, weight_decay=2e-4,
                           per_dataset={"mnist": dict(teacher_arch="papernot-mnist", asa_warmup=2)})
    p.add_argument("--teacher", default=None, help="robust teacher checkpoint; without it a PGD-AT teacher is trained first")
    p.add_argument("--teacher-arch", default="wrn-34-10", help="arch of the teacher trained when --teacher is absent")
    p.add_argument("--teacher-epochs", type=int, default=None, help="epochs of that teacher (None: --epochs)")
    p.add_argument("--asa", default="instance", choices=["instance", "conf", "off"],
                   help="attack-strength adaptation: per-sample table moved by the student (instance), teacher "
                        "confidence (conf), fixed eps (off) (all ours)")
    p.add_argument("--asa-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="clip of eps_i (None: 0.5 eps, 1.5 eps, i.e. 4/255, 12/255) (ours)")
    p.add_argument("--asa-gamma", type=float, default=None,
                   help="--asa instance step (default eps x 1.9/8: IAAT's 1.9/255 at eps 8/255, 0.071 on MNIST)")
    p.add_argument("--asa-warmup", type=int, default=None, help="--asa instance: first epochs at eps0, table frozen "
                   "(None: 10, or half of --epochs when that is fewer, so the table moves in every run; ours)")
    p.add_argument("--asa-beta", type=float, default=1.0, help="--asa instance: eps_i <- beta x the rule's target + "
                   "(1 - beta) eps_i; 1 moves a whole gamma per visit, 0.1 is IAAT's exponential average")
    p.add_argument("--asa-zero-misclassified", action="store_true",
                   help="--asa instance: the target is 0 for images the student misclassifies clean (IAAT) instead "
                        "of the range's floor")
    p.add_argument("--asa-apply", default="next", choices=["next", "now"], help="--asa instance: train the batch at "
                   "its old eps_i and move it for the next visit (2 attacks), or at the new one (IAAT; 3 attacks)")
    p.add_argument("--asa-probe", default="kl", choices=["kl", "ce"], help="--asa instance decision attacks: the "
                   "training attack, student in eval mode, or cross-entropy PGD in train mode (IAAT; 3 attacks)")
    p.add_argument("--inner", default="rslad", choices=["rslad", "adaad"],
                   help="attack objective: KL(T(x)||S(x')) or KL(T(x')||S(x')) (ours: rslad)")
    p.add_argument("--mim", default="all", choices=list(MIM), help="which MIM terms are on (logit = RSLAD's loss)")
    p.add_argument("--w-kl", type=float, default=None, help="weight of the batchmean RSLAD-form KL (None: 0.1 = RSLAD's "
                   "B*C-mean scale in RSLAD mode, --asa off --mim logit --inner rslad; else 1, ours)")
    p.add_argument("--w-nce", type=float, default=1.0, help="weight of the feature InfoNCE (ours)")
    p.add_argument("--w-at", type=float, default=1000.0, help="weight of Attention Transfer (ours, RepDistiller's)")
    p.add_argument("--nce-tau", type=float, default=0.07, help="InfoNCE temperature (ours, CRD's)")
    p.add_argument("--nce-dim", type=int, default=128, help="projection-head output size (ours, CRD's)")
    p.add_argument("--at-stages", type=int, nargs="+", default=None,
                   help="indices of the stage maps paired by Attention Transfer, same for both models (default: "
                        "the first three both models have, i.e. 0 1 2, or 0 1 on the two-stage Papernot CNNs; ours)")
    args = p.parse_args(argv)
    args.teacher_epochs = args.epochs if args.teacher_epochs is None else args.teacher_epochs
    if args.asa_warmup is None:  # 10 of the paper-scale 200 epochs; a short run keeps half of its epochs for ASA
        args.asa_warmup = max(min(10, args.epochs // 2), math.ceil(args.eps_warmup))
    rslad_mode = (args.asa, args.mim, args.inner) == ("off", "logit", "rslad")
    args.w_kl = (0.1 if rslad_mode else 1.0) if args.w_kl is None else args.w_kl
    use_nce, use_at = MIM[args.mim]
    args.w_nce, args.w_at = args.w_nce * use_nce, args.w_at * use_at
    if args.nce_tau <= 0 or args.nce_dim < 1 or (args.asa_gamma or 0) < 0 or args.asa_warmup < 0:
        raise common.UserError("--nce-tau and --nce-dim must be positive, --asa-gamma and --asa-warmup >= 0")
    if args.asa_range is not None and not 0 <= args.asa_range[0] <= args.asa_range[1]:
        raise common.UserError(f"--asa-range needs 0 <= LO <= HI, got {args.asa_range}")
    if not 0 < args.asa_beta <= 1:
        raise common.UserError(f"--asa-beta must be in (0, 1], got {args.asa_beta}")
    if args.asa == "instance" and args.asa_warmup < args.eps_warmup:  # the table holds unramped strengths
        raise common.UserError(f"--asa-warmup {args.asa_warmup} is shorter than --eps-warmup {args.eps_warmup:g}: the "
                               f"strength table would move while the training eps still ramps up; raise --asa-warmup")
    return args


def train_teacher(run):
    """Stage 1 when no --teacher is given: a PGD-AT (Madry et al. 2018) teacher in <out-dir>/teacher."""
    a = run.args
    model = run.model(a.teacher_arch)
    train_model = run.prepare(model)
    opt, sched = run.optimizer(model.parameters(), epochs=a.teacher_epochs)
    trainer = common.Trainer(run, model, opt, sched, "pgd-at", out_dir=os.path.join(a.out_dir, "teacher"),
                             epochs=a.teacher_epochs, stage="1/2 (teacher)")
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


def method_name(args):
    """'rslad' only for RSLAD's attack, loss and loss scale; RSLAD mode at another KL weight is named for what it is."""
    if (args.asa, args.mim, args.inner) != ("off", "logit", "rslad"):
        return "infoard"
    return "rslad" if args.w_kl == 0.1 else f"rslad-like-wkl{args.w_kl:g}"


def main(argv=None):
    args = get_args(argv)
    method = method_name(args)
    run = common.Run(args, method)
    if args.asa_gamma is None:  # IAAT's 1.9/255 step at eps 8/255, scaled to this eps
        args.asa_gamma = args.eps * 1.9 / 8
    if args.asa == "instance" and args.asa_warmup >= args.epochs and run.main:
        print(f"[{method}] note: --asa-warmup {args.asa_warmup} >= --epochs {args.epochs}: the strength table never "
              f"moves, so every image trains at eps0 (no ASA in this run)", flush=True)
    if args.asa == "instance" and not isinstance(run.train_loader, common.TensorLoader):
        raise common.UserError("--asa instance needs a dataset held in memory (not a streamed folder); use --asa conf")
    # frozen, eval mode, temperature 1 (RSLAD/AdaAD distil from raw logits), same dataset checked
    teacher = common.load_teacher(args.teacher, run) if args.teacher else None
    # stage counts from the teacher given, else from --teacher-arch: checked before any training
    n_s, d_s = common.arch_features(args.arch, run.info)
    if teacher is not None:
        n_t, d_t = common.feature_shape(teacher, run.info, run.device)
    else:
        n_t, d_t = common.arch_features(args.teacher_arch, run.info)
    try:
        args.at_stages = at_stage_indices(args.at_stages, n_s, n_t)
    except ValueError as e:
        if args.w_at:
            raise common.UserError(f"--at-stages: {e}") from None
    if teacher is None:
        teacher = common.load_teacher(train_teacher(run), run)
    table = StrengthTable(len(run.train_loader.y), args.eps).to(run.device) if args.asa == "instance" else None
    eps_table = table.eps if table is not None else None  # the same tensor (--resume loads into it in place)
    run.train_loader.with_index = table is not None  # then batches come as (x, y, sample indices)
    student = run.model()
    heads = ProjectionHeads(d_s, d_t, args.nce_dim).to(run.device) if args.w_nce else None
    train_model = run.prepare(student)
    opt, sched = run.optimizer(list(student.parameters()) + (list(heads.parameters()) if heads else []))
    extra = {k: v for k, v in (("heads", heads), ("eps_table", table)) if v is not None}
    trainer = common.Trainer(run, student, opt, sched, method, temperature=1.0, extra_state=extra,
                             stage=None if args.teacher else "2/2 (student)")
    lo, hi = args.asa_range or (0.5 * args.eps, 1.5 * args.eps)
    cfg = dict(eps=args.eps, alpha=args.alpha, steps=args.steps, inner=args.inner, gamma=args.asa_gamma,
               w_kl=args.w_kl, w_nce=args.w_nce, w_at=args.w_at, tau=args.nce_tau, at_stages=args.at_stages,
               asa_options=dict(beta=args.asa_beta, zero_wrong=args.asa_zero_misclassified, apply=args.asa_apply,
                                probe=args.asa_probe))
    for epoch in trainer.epochs_to_run():
        run.train_loader.set_epoch(epoch)
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        asa = "off" if table is not None and epoch < args.asa_warmup else args.asa  # warm-up at eps0
        start = table.eps.clone() if table is not None else None
        for i, batch in enumerate(run.train_loader):
            x, y, idx = batch if table is not None else (*batch, None)
            cfg["eps"], cfg["alpha"] = run.eps_at(epoch, i)  # --eps-warmup ramp (MNIST default)
            ramp = cfg["eps"] / args.eps if args.eps else 1.0  # ramps --asa conf's range (the table waits for it)
            cfg["eps_range"] = (lo * ramp, hi * ramp)
            with run.autocast():
                loss, logits = infoard_loss(train_model, teacher, heads, x, y, asa=asa, table=eps_table, idx=idx, **cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if heads is not None:
                common.average_gradients(heads)  # DDP syncs the student only
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        if table is not None:
            table.sync(start)  # every rank (and last.pt) holds the whole table
        trainer.end_epoch(epoch, loss_sum, correct, seen, t0, extra=table.stats() if table is not None else None)
    return run.done(trainer.finish())


if __name__ == "__main__":
    common.run_main(main)
