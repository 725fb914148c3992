"""AT+ALP: adversarial training with attention-map and logit pairing.

Paper: "Improving Adversarial Robustness via Attention and Adversarial Logit Pairing",
Dou Goodman, Xingjian Li, Ji Liu, Dejing Dou, Tao Wei (Baidu). arXiv 1908.11435 (2019);
Frontiers in Artificial Intelligence 4 (2022), doi 10.3389/frai.2021.752831.

Idea. Adversarial training makes the model classify PGD examples x' correctly. AT+ALP also asks the model
to *see* x and x' alike: their logits should match (Adversarial Logit Pairing, Kannan et al. 2018) and so
should their spatial attention maps, i.e. where in the image each residual stage is active (Attention
Transfer, Zagoruyko & Komodakis 2017). For a feature map A of shape (C, H, W) the attention map is

    a(A) = v / ||v||_2,   v = vec( (1/C) sum_c A_c^2 )        (length H*W; squared, so the sign of A is irrelevant)

and the training loss on a batch (x, y), with x' = PGD(x) crafted against the model in eval mode, is

    L = w_clean CE(f(x), y) + w_adv CE(f(x'), y)
        + lambda_alp  mean_{b,k} (f(x)_bk - f(x')_bk)^2
        + beta_at     sum_{j in stages} mean_{b,p} (a(A_j(x))_bp - a(A_j(x'))_bp)^2

Gradients flow through both branches of each pairing term (no stop-gradient: our reading [R]).
Special cases, same file:
  --alp 0 --at 0 --w-clean 0 --w-adv 1   Madry's PGD-AT objective (the baseline; no clean forward)
  --alp 0 --at 0                         mixed-minibatch adversarial training (Kannan et al.'s M-PGD)
  --at 0                                 ALP;   --alp 0: attention pairing only

Train and evaluate (CIFAR-10, eps 8/255, PGD-10 with step 2/255):
  python at_alp.py --dataset cifar10                                      # -> runs/at_alp-cifar10-resnet18/best.pt
  python evaluate.py runs/at_alp-cifar10-resnet18/best.pt --preset standard --diagnose   # white-box AA-lite
  python at_alp.py --dataset cifar10 --alp 0 --at 0 --w-clean 0 --w-adv 1 --out-dir runs/pgdat   # baseline
The paper's threat model ([C] abstract; the eps reading is [R]): gray-box and black-box PGD only, 10 to 200
iterations, eps 0.25 and 0.5 of the pixel range = 64/255 and 128/255 (as the sister paper ATLPA writes),
headline on Flowers-17. Gray-box = PGD crafted on an independently trained copy (another seed), black-box =
on a model of another arch (--transfer-steps: iterations, step eps/4, random start). Flowers-17 goes in as
TREE/train/<class>/*.jpg + TREE/test/<class>/*.jpg (README, Data), streamed at 224 px into torchvision's
ImageNet networks; network, training eps and --pretrained are ours [R]; repeat with --eps 0.50196 (128/255).
Batch 128 fits an 80 GB GPU in float32 (README's memory table); on 24 GB use --batch-size 64:
  python at_alp.py --dataset folder --data-dir TREE --eps 0.25098 --arch resnet50 --batch-size 128 --out-dir runs/f17
  python at_alp.py --dataset folder --data-dir TREE --eps 0.25098 --arch resnet50 --batch-size 128 --out-dir runs/f17-copy \
      --seed 1                                                                                        # gray src
  python at_alp.py --dataset folder --data-dir TREE --eps 0.25098 --arch mobilenet_v2 --batch-size 128 \
      --out-dir runs/f17-mnv2                                                                         # black src
  T="--attacks transfer --eps 0.25098 --transfer-steps 200"                     # also --transfer-steps 10
  python evaluate.py runs/f17/best.pt $T --transfer-from runs/f17-copy/best.pt --json runs/f17/gray-64-200.json
  python evaluate.py runs/f17/best.pt $T --transfer-from runs/f17-mnv2/best.pt --json runs/f17/black-64-200.json
  python evaluate.py runs/f17/best.pt --preset standard --diagnose  # white-box AA-lite at eps 4/255 (and --eps 0.25098)
Report white-box AA-lite next to any transfer number: logit pairing is known to look far stronger than it
is under weak or transfer attacks (Engstrom et al. 2018, arXiv 1807.10272; Mosbach et al. 2018).
Measured on a CPU, 1,000 test images (README, Results): real MNIST, `--dataset mnist` (10 epochs, one seed),
98.8% clean / 89.9% AA-lite at eps 0.3 vs PGD-AT's 99.4% / 92.3% (9 images robust only for AT+ALP, 33 only
for PGD-AT); CIFAR-10 (JPEG copy), wrn-16-1, 10,000 images x 4 epochs, eps 8/255, 38.2% / 18.5% vs PGD-AT's
35.4% / 21.8% (32 / 65 images, p = 0.001). No Flowers-17 numbers.

Fidelity (legend in README.md, 'Fidelity'): only the abstract of the paper was available to us.
  [C]: pairing of logits and of Zagoruyko-Komodakis attention maps between clean and adversarial examples
    on top of adversarial training, and the threat model above (abstract); ALP's loss = mixed CE + lambda *
    MSE of logits and its joint forward of [x; x'] with the attack crafted in eval mode (tensorflow/models,
    research/adversarial_logit_pairing);
    the attention map = channel mean of squares, L2-normalised, and its loss = mean squared difference,
    summed over residual stages with beta = 1e3 (szagoruyko/attention-transfer, utils.py).
  [R] threat model: the 64/255 and 128/255 reading of eps, the step eps/4 and the source models (seed-1
    copy, MobileNetV2).
  [R] loss: how the two precursors are combined into one loss; the constants
    w_clean = w_adv = 0.5, lambda_alp = 0.5, beta_at = 1000 (taken from the precursors, not confirmed for
    AT+ALP); the stages paired (default all); untargeted PGD on the true label for training (ALP used
    least-likely targeted PGD: --targeted-ll); no label smoothing (ALP's code used 0.1); the architecture,
    optimiser and schedule (the shared defaults of this repository).
  [R] stage maps: the maps paired are common.py's. For wrn the third stage is taken after the final
    BN-ReLU, whereas the AT code pairs that group's output before the BN (the other stages match).
"""
import time

import torch
import torch.nn.functional as F

import common


def attention_pairing_loss(stages_a, stages_b):
    """sum_j mean_{b,p} (a(A_j) - a(B_j))^2 over paired stage maps (the AT code's at_loss, summed).

    a = common.attention_map: squaring makes it depend on activation magnitude only (so pre-activation
    residual sums work too); normalising makes it a *where* map, independent of the stage's overall scale.
    """
    if len(stages_a) != len(stages_b):
        raise ValueError(f"got {len(stages_a)} and {len(stages_b)} stage maps to pair")
    return sum((common.attention_map(a) - common.attention_map(b)).pow(2).mean()
               for a, b in zip(stages_a, stages_b))


def craft_adversary(model, x, y, eps, alpha, steps, targeted_ll=False):
    """PGD training examples, crafted with the model in eval mode (as ALP's code); the mode is restored.

    Default: untargeted CE on the true label (Madry). targeted_ll: move towards the least-likely class of
    the clean prediction (ALP's `pgdll` attack), i.e. descend the CE of that class.
    """
    was_training = model.training
    model.eval()
    if targeted_ll:
        with torch.no_grad():
            target = model(x).argmin(1)
        x_adv = common.pgd(model, x, target, eps, alpha, steps, targeted=True)
    else:
        x_adv = common.pgd(model, x, y, eps, alpha, steps)
    model.train(was_training)
    return x_adv


def at_alp_loss(model, x, y, eps, alpha, steps, w_clean=0.5, w_adv=0.5, lam_alp=0.5, beta_at=1000.0,
                stages=None, targeted_ll=False, separate_forward=False):
    """The AT+ALP training loss on one batch; crafts its own x'. Returns (loss, logits on x').

    model: any module mapping images in [0, 1] to logits; only with beta_at != 0 is it called as
      model(x, return_features=True) -> (logits, {"stages": [stage maps]}).
    The forward for the loss runs in the mode the caller left the model in (train mode in training).
    stages: indices of the stage maps (model(x, return_features=True)[1]["stages"]) to pair; None = all.
    separate_forward: run x and x' through the model separately. The default is ONE forward over the
      concatenated batch [x; x'], as ALP's code does: BatchNorm then normalises clean and adversarial
      examples with the same batch statistics, so the paired features and logits differ only because the
      inputs differ, not because each half was normalised with its own mean and variance.
    """
    x_adv = craft_adversary(model, x, y, eps, alpha, steps, targeted_ll)
    if w_clean == 0 and lam_alp == 0 and beta_at == 0:
        # Nothing uses the clean batch: skip its forward (BatchNorm sees only x'). With w_adv = 1 this is
        # Madry's objective; the attack is crafted in eval mode (ours, as ALP's code; Madry's used train mode).
        logits_adv = model(x_adv)
        return w_adv * F.cross_entropy(logits_adv.float(), y), logits_adv
    need_at = beta_at != 0

    def forward(inp):  # -> (logits, stage maps or []); return_features only when attention pairing is on
        if not need_at:
            return model(inp), []
        logits, feats = model(inp, return_features=True)
        return logits, feats["stages"]

    if separate_forward:
        (logits_c, maps_c), (logits_a, maps_a) = forward(x), forward(x_adv)
    else:  # first half of the joint batch is clean, second half adversarial
        logits, maps = forward(torch.cat([x, x_adv]))
        (logits_c, logits_a), halves = logits.chunk(2), [m.chunk(2) for m in maps]
        maps_c, maps_a = [h[0] for h in halves], [h[1] for h in halves]
    zc, za = logits_c.float(), logits_a.float()
    loss = w_clean * F.cross_entropy(zc, y) + w_adv * F.cross_entropy(za, y)
    if lam_alp:
        loss = loss + lam_alp * (zc - za).pow(2).mean()  # ALP: squared logit distance, mean over B x K
    if need_at:
        n = len(maps_c)
        idx = list(range(n)) if stages is None else list(stages)
        if any(not 0 <= j < n for j in idx):
            raise ValueError(f"stages {idx}: this model has {n} stage maps (indices 0..{n - 1})")
        loss = loss + beta_at * attention_pairing_loss([maps_c[j] for j in idx], [maps_a[j] for j in idx])
    return loss, logits_a


def get_args(argv=None):
    p = common.base_parser("AT+ALP: adversarial training with attention and adversarial logit pairing "
                           "(Goodman et al., arXiv 1908.11435)")
    p.add_argument("--w-clean", type=float, default=0.5,
                   help="weight of CE on clean x (ALP's mixed minibatch; precursor's value, not confirmed for AT+ALP)")
    p.add_argument("--w-adv", type=float, default=0.5,
                   help="weight of CE on adversarial x' (precursor's value, not confirmed for AT+ALP)")
    p.add_argument("--alp", type=float, default=0.5,
                   help="lambda_alp, weight of the logit pairing MSE (ALP's README value; not confirmed for AT+ALP)")
    p.add_argument("--at", type=float, default=1000.0,
                   help="beta_at, weight of the attention pairing loss (Attention Transfer's value; not confirmed for AT+ALP)")
    p.add_argument("--at-stages", type=int, nargs="+", default=None,
                   help="stage indices to pair attention on (0 = earliest); None = all the model returns: "
                        "4 for resnet18/mobilenetv2, 3 for wrn, 2 for papernot (ours)")
    p.add_argument("--targeted-ll", action="store_true",
                   help="train on PGD towards the least-likely class (ALP's pgdll) instead of untargeted CE")
    p.add_argument("--separate-forward", action="store_true",
                   help="forward x and x' separately (BatchNorm statistics per half) instead of one joint "
                        "[x; x'] forward as in ALP's code")
    args = p.parse_args(argv)
    for name in ("w_clean", "w_adv", "alp", "at"):
        if getattr(args, name) < 0:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.w_clean + args.w_adv <= 0:
        raise common.UserError("--w-clean + --w-adv must be > 0 (the loss needs a classification term)")
    if args.steps < 1:
        raise common.UserError(f"adversarial training needs --steps >= 1, got {args.steps}")
    if args.at_stages is not None and min(args.at_stages) < 0:
        raise common.UserError(f"--at-stages takes indices >= 0, got {args.at_stages}")
    return args


def main(argv=None):
    args = get_args(argv)
    run = common.Run(args, "at_alp")
    model = run.model()
    if args.at and args.at_stages is not None:
        n, _ = common.feature_shape(model, run.info, run.device)
        if max(args.at_stages) >= n:
            raise common.UserError(f"--at-stages {args.at_stages}: --arch {args.arch} has {n} stage maps "
                                   f"(indices 0..{n - 1})")
    train_model = run.prepare(model)
    opt, sched = run.optimizer(model.parameters())
    trainer = common.Trainer(run, model, opt, sched, "at_alp")  # best.pt by validation PGD-10
    for epoch in trainer.epochs_to_run():
        run.train_loader.set_epoch(epoch)
        model.train()
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for i, (x, y) in enumerate(run.train_loader):
            eps, alpha = run.eps_at(epoch, i)  # --eps-warmup ramp (MNIST default), else args.eps/alpha
            with run.autocast():
                loss, logits = at_alp_loss(train_model, x, y, eps, alpha, args.steps,
                                           args.w_clean, args.w_adv, args.alp, args.at, args.at_stages,
                                           args.targeted_ll, args.separate_forward)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        trainer.end_epoch(epoch, loss_sum, correct, seen, t0)
    return run.done(trainer.finish())


if __name__ == "__main__":
    common.run_main(main)
