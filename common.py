"""Shared plumbing for the robust-distill method scripts; each method file imports this module and nothing else of ours.

Map, in reading order:
  1. what the method losses use: `pgd` (L-inf PGD, per-sample eps allowed), `cw_margin_loss`, `attention_map`,
     `average_gradients`. A loss copied into another project needs only this part;
  2. the model contract: `Classifier`, `build_model`, `load_teacher`;
  3. the training loop's helpers: `run_main`, `base_parser` (flags; per-dataset and per-arch defaults resolved
     in one place), `Run` (device, data, model, optimizer of one run), `Trainer` (epochs, validation,
     checkpoints, resume), `make_schedule`;
  4. data: `load_dataset`, `TensorLoader`, `StreamLoader`, `get_loaders`;
  5. architectures (ResNet-18, PreAct ResNet-18, WRN-D-K, MobileNetV2, the Papernot CNNs, torchvision's ImageNet
     nets) and their activation memory;
  6. infrastructure: checkpoint files, atomic writes, output-folder locks, progress lines.

Conventions used everywhere:
  * images are float tensors in [0, 1], NCHW; normalisation is the first layer of every model, so
    attacks and epsilons live in pixel space (the RobustBench convention);
  * `model(x)` returns logits divided by `model.temperature` (1 unless a checkpoint says otherwise);
    `model(x, return_features=True)` returns `(logits, {"stages": [maps...], "pooled": vector})`;
  * user mistakes raise `UserError`, which the scripts print as one line instead of a traceback.
"""
import argparse
import atexit
import contextlib
import datetime
import errno
import json
import math
import os
import random
import shutil
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input (bad flag, missing file, ...): shown as one clear line."""


# ============================================================================================================
# 1. What the method losses use: the attack, attention maps, gradient averaging
# ============================================================================================================
def pgd(model, x, y, eps, alpha, steps, loss="ce", random_start=True, targeted=False, target=None):
    """L-infinity projected gradient ascent on `loss`; returns x_adv (detached, in [0,1], |x_adv - x| <= eps).

    model:  any callable; its output goes to the loss (logits for the built-in losses). The caller
            chooses train/eval mode. Gradients are taken w.r.t. the perturbation only.
    eps, alpha: floats, or (B,) tensors for per-sample strength (InfoARD's adaptive attack).
    loss:   'ce' (cross-entropy on y), 'cw' (logit margin), 'kl' (KL(target || softmax(output)),
            `target` a probability matrix, TRADES-style), or a callable(output, y) -> per-sample losses.
    random_start: True for U(-eps, eps) (clamped into [0,1]), 'normal' for 0.001 N(0, 1) with the first gradient
            taken at the unclamped x + 0.001 N(0, 1), as the TRADES, TRADES-AWP and RSLAD codes do; False for none.
            Every iterate after a step is projected into the eps-ball and [0,1].
    targeted: move towards class y instead of away from it (descend the CE).
    """
    if steps < 0 or (not torch.is_tensor(eps) and eps < 0):
        raise ValueError("pgd needs steps >= 0 and eps >= 0")
    if loss == "kl" and target is None:
        raise ValueError("loss='kl' needs target probabilities")
    eps_b, alpha_b = _per_sample(eps, x), _per_sample(alpha, x)
    x = x.detach()

    def project(d):  # into the eps-ball around x, then into the image range [0,1]
        d = torch.max(torch.min(d, eps_b), -eps_b) if torch.is_tensor(eps_b) else d.clamp(-eps_b, eps_b)
        return (x + d).clamp(0, 1) - x

    if random_start == "normal":  # not projected: the reference codes' first gradient is at the unclamped point
        delta = 0.001 * torch.randn_like(x)
    elif random_start:
        delta = (x + (torch.rand_like(x) * 2 - 1) * eps_b).clamp(0, 1) - x
    else:
        delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        out = model(x + delta)
        if callable(loss):
            value = loss(out, y)
        elif loss == "ce":
            value = F.cross_entropy(out.float(), y, reduction="none")
        elif loss == "cw":
            value = cw_margin_loss(out.float(), y)
        elif loss == "kl":
            value = F.kl_div(F.log_softmax(out.float(), 1), target, reduction="none").sum(1)
        else:
            raise ValueError(f"unknown pgd loss '{loss}'")
        grad, = torch.autograd.grad(value.sum() * (-1 if targeted else 1), delta)
        with torch.no_grad():
            delta = project(delta + alpha_b * grad.sign())
    return (x + (delta if steps else project(delta))).detach()


def _per_sample(v, x):
    """A float or a (B,) tensor as something that broadcasts over x."""
    if torch.is_tensor(v):
        if v.dim() != 1 or len(v) != len(x):
            raise ValueError(f"per-sample value must have shape ({len(x)},), got {tuple(v.shape)}")
        return v.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return float(v)


def cw_margin_loss(logits, y):
    """Per-sample CW margin, maximised by the attacker: max_{i != y} z_i - z_y (> 0 means misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - z_y


def attention_map(fmap, size=None):
    """Attention Transfer map (Zagoruyko & Komodakis 2017) of a (B, C, H, W) activation: channel mean of
    squares (sign-free, so pre-activation sums work too), optionally average-pooled to `size` (to compare
    stages of different resolution), flattened, unit L2 norm per sample: *where* the network looks."""
    a = fmap.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


def average_gradients(module):
    """All-reduce and average .grad of `module` across ranks (for helper models DDP does not wrap)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


# ============================================================================================================
# 2. The model contract: Classifier, build_model, load_teacher
# ============================================================================================================
class Classifier(nn.Module):
    """Base class: normalisation inside, temperature on the way out, features on request.

    Subclasses implement `body(x) -> (logits, list_of_stage_maps, pooled_features)`.
    """

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.temperature = 1.0  # the deployed model outputs logits / temperature (checkpoint field)
        self.input_shape = None  # (C, H, W) the model was built for; build_model sets it
    fixed_size = False  # True where a flatten-then-FC head fixes H and W; otherwise only C is checked

    def forward(self, x, return_features=False):
        want = self.input_shape if self.fixed_size else self.input_shape and self.input_shape[:1]
        if want and (x.dim() != 4 or tuple(x.shape[1:1 + len(want)]) != want):
            expected = ", ".join(map(str, want)) + ("" if self.fixed_size else ", H, W")
            raise ValueError(f"{getattr(self, 'arch', type(self).__name__)} expects inputs of shape (N, {expected}), "
                             f"got {tuple(x.shape)}")
        logits, stages, pooled = self.body((x - self.mean) / self.std)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return (logits, {"stages": stages, "pooled": pooled}) if return_features else logits


ARCHS = ("preact-resnet18", "resnet18", "wrn-D-K", "mobilenetv2", "papernot-mnist", "papernot-cifar",
         "resnet50", "wide_resnet50_2", "mobilenet_v2")


# Each arch's natural input (channels, size, mean, std) when build_model is not told: MNIST's for papernot-mnist,
# CIFAR's for the rest.
NATURAL_INPUT = {"papernot-mnist": (1, 28, (0.1307,), (0.3081,))}

# Large images get torchvision's ImageNet definitions: resnet18 and mobilenetv2 switch to them from this size
# on (our CIFAR stems keep full resolution through the first stage: at 224 px that is ~220 MiB of activations
# per image for resnet18 instead of ~21); resnet50, wide_resnet50_2 and mobilenet_v2 exist only in that form.
IMAGENET_STEM_FROM = 64
TORCHVISION = {"resnet18": "resnet18", "mobilenetv2": "mobilenet_v2", "resnet50": "resnet50",
               "wide_resnet50_2": "wide_resnet50_2", "mobilenet_v2": "mobilenet_v2"}
IMAGENET_ONLY = ("resnet50", "wide_resnet50_2", "mobilenet_v2")


def build_model(arch, num_classes, in_channels=None, image_size=None, mean=None, std=None, imagenet_stem=None,
                pretrained=False):
    """Build an architecture by name (see ARCHS; wrn-D-K means e.g. wrn-34-10, wrn-28-10, wrn-10-1).

    Unset input arguments take the arch's natural input (1x28x28 for papernot-mnist, else 3x32x32). The
    model refuses inputs of another shape with a one-line ValueError. `imagenet_stem` None picks by size:
    torchvision's ImageNet network (TorchvisionNet) for resnet18 / mobilenetv2 from IMAGENET_STEM_FROM px on,
    our CIFAR definition below; a checkpoint records the choice (model.imagenet_stem). `pretrained` loads
    torchvision's ImageNet weights (ImageNet definitions only; the normalisation then is ImageNet's)."""
    c, size, m, s = NATURAL_INPUT.get(arch, (3, 32, CIFAR_MEAN, CIFAR_STD))
    in_channels, image_size = in_channels or c, image_size or size
    if imagenet_stem is None:
        imagenet_stem = arch in IMAGENET_ONLY or (arch in TORCHVISION and image_size >= IMAGENET_STEM_FROM)
    if imagenet_stem:
        if arch not in TORCHVISION:
            raise UserError(f"arch '{arch}' has no ImageNet definition (those are {', '.join(TORCHVISION)})")
        if image_size < IMAGENET_STEM_FROM:
            raise UserError(f"{arch} is torchvision's ImageNet network: it downsamples 32x, so {image_size}-px "
                            f"images would collapse to a {max(image_size // 32, 1)}x{max(image_size // 32, 1)} map; "
                            f"it needs {IMAGENET_STEM_FROM} px or more (for small images: resnet18, preact-resnet18, "
                            f"wrn-34-10, mobilenetv2)")
        if pretrained:
            mean, std = IMAGENET_MEAN, IMAGENET_STD  # the statistics the ImageNet weights were trained with
        model = TorchvisionNet(TORCHVISION[arch], num_classes, in_channels, mean or m, std or s, pretrained)
    elif pretrained:
        raise UserError(f"--pretrained loads torchvision's ImageNet weights, which exist for the ImageNet "
                        f"definitions only ({', '.join(TORCHVISION)} on images of {IMAGENET_STEM_FROM} px and up), "
                        f"not for {arch} at {image_size} px")
    else:
        model = _build(arch, num_classes, in_channels, image_size, mean or m, std or s)
    model.arch = arch  # recorded in checkpoints, so a teacher of another arch is rebuilt correctly
    model.imagenet_stem = bool(imagenet_stem)  # recorded too: the same name is rebuilt as the same network
    model.input_shape = (in_channels, image_size, image_size)
    return model


def _build(arch, num_classes, in_channels, image_size, mean, std):
    if len(mean) != in_channels:
        mean, std = (sum(mean) / len(mean),) * in_channels, (sum(std) / len(std),) * in_channels
    common = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if arch in ("resnet18", "preact-resnet18"):
        return ResNet18(preact=arch.startswith("preact"), **common)
    if arch == "mobilenetv2":
        return MobileNetV2(**common)
    if arch in ("papernot-mnist", "papernot-cifar"):
        widths, fc = ((32, 64), 200) if arch == "papernot-mnist" else ((64, 128), 256)
        return PapernotCNN(widths, fc, size=image_size, **common)
    parts = arch.split("-")
    if len(parts) == 3 and parts[0] == "wrn" and parts[1].isdigit() and parts[2].isdigit():
        return WideResNet(int(parts[1]), int(parts[2]), **common)
    raise UserError(f"unknown arch '{arch}' (choose from {', '.join(ARCHS)})")


def model_for(arch, info, pretrained=False):
    return build_model(arch, info.num_classes, info.channels, info.size, info.mean, info.std, pretrained=pretrained)


def feature_shape(model, info, device):
    """(number of stage maps, pooled feature size) of a model, from one forward in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, f = model(torch.zeros(1, info.channels, info.size, info.size, device=device), return_features=True)
    model.train(was_training)
    return len(f["stages"]), f["pooled"].shape[1]


def arch_features(arch, info):
    """(number of stage maps, pooled feature size) of `arch` on this data, from a throwaway CPU build that leaves
    the random state as it was: checks an arch name, its input size and stage indices before any training."""
    with torch.random.fork_rng(devices=[]):
        return feature_shape(model_for(arch, info), info, "cpu")


def load_teacher(path, run):
    """A frozen teacher from any checkpoint of this project: eval mode, no gradients, temperature 1 (the
    method applies its own temperature explicitly); refuses a checkpoint made for other data."""
    ck = load_checkpoint(path)
    if ck.get("dataset") != run.args.dataset or ck.get("num_classes") != run.info.num_classes:
        raise UserError(f"teacher {path} is for {ck.get('dataset')} ({ck.get('num_classes')} classes), "
                        f"not {run.args.dataset} ({run.info.num_classes} classes)")
    teacher, _ = build_model_from_checkpoint(ck, run.device)
    teacher.temperature = 1.0
    return run.to_device(teacher).eval().requires_grad_(False)


def unwrap(model):
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ============================================================================================================
# 3. The training loop's helpers: arguments, Run, Trainer, schedules
# ============================================================================================================
def run_main(main_fn, argv=None):
    """Call `main_fn(argv)`, turning UserError into a one-line message and exit status 2."""
    try:
        result = main_fn(argv)
        if dist.is_initialized():  # every rank got here: leave the process group cleanly (NCCL warns otherwise)
            dist.destroy_process_group()
        return result
    except UserError as e:
        Progress.close_all()  # no live progress line drawing over the message
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        Progress.close_all()


def base_parser(description, per_dataset=None, **defaults):
    """The flags every method script shares; `defaults` sets the method's own (paper) defaults, `per_dataset`
    ({dataset: {flag: value}}) its own entries of DATASET_DEFAULTS."""
    p = _Parser(description=description, formatter_class=_HelpFormatter,
                per_dataset=per_dataset, epilog="Flags marked [per dataset] or [per arch] take the value listed for "
                "that dataset (first) or arch unless given; the (default: ...) shown is for the others. The method "
                "defaults are the papers' CIFAR settings, which do not train on MNIST (README, 'Per-dataset defaults').")
    s = p.add_argument_group("shared by every method script")  # after the method's own flags in --help
    s.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    s.add_argument("--data-dir", default="./data", help="where torchvision data lives / the folder tree")
    s.add_argument("--arch", default="resnet18", help=f"one of {', '.join(ARCHS)}")
    s.add_argument("--epochs", type=int, default=200, help="training epochs")
    s.add_argument("--batch-size", type=int, default=128, help="training batch size (per process under torchrun)")
    s.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="sgd (with --momentum) or adam")
    s.add_argument("--lr", type=float, default=None, help="default: 0.1 with SGD, 1e-3 with Adam")
    s.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    s.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="SGD Nesterov momentum")
    s.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (the optimizer's weight_decay)")
    s.add_argument("--schedule", default="piecewise", choices=["piecewise", "cosine", "onecycle", "constant"],
                   help="lr schedule, stepped every batch: piecewise (x --gamma at each --milestones epoch), cosine to "
                        "0, one-cycle (up to --lr at 40%%, then down to 0), constant")
    s.add_argument("--milestones", type=int, nargs="*", default=[100, 150],
                   help="piecewise: lr *= gamma once this many epochs are done (99: from the 100th epoch on)")
    s.add_argument("--gamma", type=float, default=0.1,
                   help="piecewise: lr factor at each milestone (not --awp-gamma or --asa-gamma)")
    s.add_argument("--eps", type=float, default=None, help="L-inf radius (default: 8/255 CIFAR/SVHN, 0.3 MNIST, 4/255 large)")
    s.add_argument("--alpha", type=float, default=None, help="attack step (default 2.5 eps / steps: 2/255 on CIFAR)")
    s.add_argument("--steps", type=int, default=10, help="attack steps during training")
    s.add_argument("--eps-warmup", type=float, default=0,
                   help="epochs over which the training eps (and step) ramps linearly from 0 to --eps")
    s.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop (pad 4) + flip of training images (flip off for MNIST/SVHN)")
    s.add_argument("--val-size", type=int, default=1000, help="training images held out to pick the best checkpoint")
    s.add_argument("--train-size", type=int, default=None,
                   help="train on a fixed random subset of N images (taken after the validation hold-out)")
    s.add_argument("--seed", type=int, default=0, help="random seed (torchrun rank r uses seed + r)")
    s.add_argument("--out-dir", default=None, help="default: runs/<method>-<dataset>-<arch>, plus -seed<N> and "
                   "-eps<E> when --seed or --eps is given (one run per out-dir)")
    s.add_argument("--workers", type=int, default=8, help="CPU loader workers (large-image folders only)")
    s.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on any device (default: on for CUDA, off for CPU)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for models and batches (default: on for CUDA, off for CPU)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm); default: "
                        "over each process's own --batch-size images, as nn.DataParallel in AWP's and RSLAD's code")
    s.add_argument("--pretrained", action="store_true",
                   help="start from torchvision's ImageNet weights (ImageNet definitions only: images of "
                        f"{IMAGENET_STEM_FROM} px and up; downloaded once by torchvision)")
    s.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir (its best.pt, "
                   "last.pt and log.jsonl are deleted at start); without it or --resume a used out-dir is refused")
    s.add_argument("--skip-bad-images", action="store_true",
                   help="folder trees: leave out files that are not readable images (or not the tree's image size)")
    s.add_argument("--dist-timeout", type=float, default=300,
                   help="torchrun: seconds a process waits for the others in a collective before the job stops")
    s.add_argument("--device", default=None,
                   help="cuda / cuda:N / cpu (default: cuda if available; under torchrun each process takes GPU LOCAL_RANK)")
    p.set_defaults(**defaults)
    return p


class Run:
    """Everything about one training run that is not the method: device, ranks, data, logging, files."""

    def __init__(self, args, method):
        self.args, self.method = args, method
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(args.device, self.world, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=args.dist_timeout))  # a hung rank stops the job
            exit_with_launcher()
        self.main = self.rank == 0
        args.out_dir = args.out_dir or default_out_dir(method, args)
        if self.main:
            claim_out_dir(args)  # before data and training: a used, locked or unwritable out-dir stops here
        seed_everything(args.seed + self.rank)
        # The GPU path is one decision each, on any device (the CPU runs it with --amp --channels-last);
        # the resolved values go back into args, so every checkpoint records the precision it trained in.
        gpu = self.device.type == "cuda"
        asked = args.amp
        self.amp = args.amp = native_bf16(self.device) if asked is None else asked
        self.precision = precision_label(self.device, asked)  # for the log: bf16 or float32, and why
        self.channels_last = args.channels_last = gpu if args.channels_last is None else args.channels_last
        self.train_loader, self.val_loader, self.test_loader, self.info = get_loaders(args, self.device, self.rank, self.world)
        teacher_arch = None if getattr(args, "teacher", None) else getattr(args, "teacher_arch", None)
        for arch in {args.arch, teacher_arch or args.arch}:  # a bad --arch / --teacher-arch fails now, not after a stage
            arch_features(arch, self.info)
        args.eps = self.info.eps if args.eps is None else args.eps
        args.alpha = 2.5 * args.eps / max(args.steps, 1) if args.alpha is None else args.alpha

    def autocast(self):
        """bf16 autocast on this run's device with --amp (the default on CUDA); a no-op otherwise."""
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, model):
        """Move a model to the device, in channels_last memory format with --channels-last."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def model(self, arch=None):
        """Build `arch` (default --arch) for this dataset, on the device (see to_device)."""
        return self.to_device(model_for(arch or self.args.arch, self.info, getattr(self.args, "pretrained", False)))

    def prepare(self, model):
        """Wrap for training: DistributedDataParallel under torchrun, torch.compile with --compile."""
        if self.world > 1 and getattr(self.args, "sync_bn", False):
            if self.device.type != "cuda":
                raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU implementation)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place: same parameters, same state_dict
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.args.compile:
            model = torch.compile(model)
        return model

    def eps_at(self, epoch, i=0):
        """(eps, alpha) of the training attack at batch i of `epoch`: a linear ramp over --eps-warmup epochs."""
        a = self.args
        if not a.eps_warmup:
            return a.eps, a.alpha
        f = min(1.0, (epoch + (i + 1) / max(len(self.train_loader), 1)) / a.eps_warmup)
        return a.eps * f, a.alpha * f

    def done(self, path, diagnose=False):
        """The script's last lines: the checkpoint to deploy and an evaluate command that fits this device (a
        CPU gets a quick look at 200 test images, with a few masking checks if `diagnose`; a GPU AA-lite and the
        masking checks on the full test set). Returns path."""
        if self.main:
            if self.device.type == "cpu":
                flags = "--preset quick --n 200" + (" --diagnose --diagnose-n 16 --square-queries 100" if diagnose else "")
                tail = "   # a quick CPU look; on a GPU: --preset standard --diagnose"
            else:
                flags, tail = "--preset standard --diagnose", ""
            print(f"[{self.method}] done: {path}\nevaluate it: python evaluate.py {path} {flags}{tail}", flush=True)
        return path

    def optimizer(self, params, steps_per_epoch=None, epochs=None):
        """SGD (momentum, optional Nesterov) or Adam, plus the --schedule as a per-iteration LambdaLR."""
        a = self.args
        if a.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=a.lr, weight_decay=a.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                                  nesterov=a.nesterov)
        sched = make_schedule(opt, a.schedule, epochs or a.epochs, steps_per_epoch or len(self.train_loader),
                              a.milestones, a.gamma)
        return opt, sched


class Trainer:
    """Per-epoch bookkeeping shared by all methods: validation, log line + JSON lines, best/last checkpoints, resume.

    Files in out_dir: log.jsonl, last.pt (with optimizer/schedule state, for --resume) and best.pt (best
    validation PGD accuracy, or best clean accuracy with select='clean').
    stage: e.g. "1/2 (teacher)" for the start line; train_on: what the loop's training accuracy is measured
    on, "adv" (adversarial examples) or "clean".
    """

    def __init__(self, run, model, optimizer, schedule, method, out_dir=None, epochs=None, temperature=1.0,
                 select="pgd", extra_state=None, stage=None, train_on="adv"):
        self.run, self.model, self.opt, self.sched, self.method = run, model, optimizer, schedule, method
        self.out_dir = out_dir or run.args.out_dir
        self.epochs = epochs if epochs is not None else run.args.epochs
        self.temperature, self.select, self.train_on = temperature, select, train_on
        # the selection metric: validation PGD-10 accuracy (ties go to the cleaner model), or clean accuracy
        self.best_key = "best_val_clean" if select == "clean" else "best_val_pgd10"
        self.best_metrics = {}  # best_epoch and the selection metric of best.pt, for the log
        self.extra_state = extra_state or {}  # name -> module or optimizer also saved in last.pt (e.g. heads)
        if dist.is_initialized():  # Run seeds each rank differently: helper modules start from rank 0's weights
            for obj in self.extra_state.values():
                for t in obj.state_dict().values() if isinstance(obj, nn.Module) else ():
                    dist.broadcast(t, 0)
        self.start_epoch, self.best, self.t0 = 0, -1.0, time.time()
        self.saved_epoch = None  # epoch (1-based) of the last.pt on disk: the "last good checkpoint"
        self.resumes = []  # one entry per --resume: the epoch it continued at and the flags it changed
        if run.main:
            os.makedirs(self.out_dir, exist_ok=True)
            remove_stale_tmp(self.out_dir)
            a, m = run.args, unwrap(model)
            print(f"[{method}] start{f' stage {stage}' if stage else ''}: arch {getattr(m, 'arch', a.arch)}, dataset "
                  f"{a.dataset}, device {run.device}{f' x{run.world}' if run.world > 1 else ''}, "
                  f"{run.precision}{', channels_last' if run.channels_last else ''}, "
                  f"{self.epochs} epoch{'s' * (self.epochs != 1)}, out-dir {self.out_dir}", flush=True)
        if run.args.resume:
            self._resume()

    @property
    def done(self):
        return self.start_epoch >= self.epochs

    # Flags a resumed run may change (they take effect and are logged), except these, which --resume ignores:
    RESUME_IGNORES = ("resume", "overwrite", "out_dir", "device", "workers", "compile", "dist_timeout")

    def _resume(self):
        """Continue from last.pt: refuse one written by another run (method, arch, data, optimizer, batch, number of
        processes); restore weights, optimizer, schedule and every rank's RNG. Flags changed since then (lr,
        epochs, ...) take effect: the optimizer gets the command's hyperparameters and the schedule its base lr."""
        r, a = self.run, self.run.args
        path = os.path.join(self.out_dir, "last.pt")
        if not os.path.exists(path):
            if r.main:
                print(f"--resume: no {path} yet, starting from scratch")
                self._trim_log(0)
            return
        ckpt = load_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "schedule", "rng", "epoch", "metrics", "args") if k not in ckpt]
        if missing:
            raise UserError(f"{path} cannot be resumed: it lacks {', '.join(missing)} (only a last.pt can)")
        saved, now = ckpt["args"], {k: _plain(v) for k, v in vars(a).items()}
        rng = ckpt["rng"] if isinstance(ckpt["rng"], dict) else {"cpu": [ckpt["rng"]] * r.world}  # older: rank 0's only
        checks = [("method", ckpt.get("method"), self.method),
                  ("arch", ckpt.get("arch"), getattr(unwrap(self.model), "arch", a.arch)),
                  ("dataset", ckpt.get("dataset"), a.dataset), ("classes", ckpt.get("num_classes"), r.info.num_classes),
                  *((f"--{k.replace('_', '-')}", saved.get(k), now.get(k))
                    for k in ("optimizer", "batch_size", "train_size", "val_size")),
                  ("processes", len(rng["cpu"]), r.world)]
        wrong = [f"{k} {old} (this command: {new})" for k, old, new in checks if old != new]
        if wrong:
            raise UserError(f"{path} belongs to another run: {', '.join(wrong)}; resume it with its own settings, "
                            f"or pass --overwrite to replace it, or another --out-dir")
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["schedule"])
            for name, obj in self.extra_state.items():
                obj.load_state_dict(ckpt["extra"][name])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{path} was written by a run with other settings ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:120]}); resume with the same flags or use another "
                            f"--out-dir") from None
        # The command's hyperparameters win over the saved ones; the lr through the schedule's base lr.
        for g, f in zip(self.opt.param_groups, fresh):
            g.update({k: v for k, v in f.items() if k != "lr"})
        self.sched.base_lrs = [f["initial_lr"] for f in fresh]
        for g, base, factor in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            g["lr"] = base * factor(self.sched.last_epoch)
        torch.set_rng_state(rng["cpu"][r.rank])
        if r.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][r.rank], r.device)
        self.start_epoch, self.best = ckpt["epoch"] + 1, ckpt.get("best_score", -1.0)
        self.best_metrics = {k: ckpt["metrics"][k] for k in ("best_epoch", self.best_key) if k in ckpt["metrics"]}
        self.saved_epoch = ckpt["epoch"] + 1
        changed = {k: [saved[k], v] for k, v in now.items()
                   if k in saved and k not in self.RESUME_IGNORES and saved[k] != v}
        self.resumes = list(ckpt.get("resumes", [])) + [{"at_epoch": self.start_epoch + 1, "changed": changed}]
        if r.main:
            self._trim_log(self.saved_epoch)
            if self.done:
                print(f"resumed from {path}: this stage is complete ({self.saved_epoch}/{self.epochs} epochs)")
                return
            print(f"resumed from {path}: continuing at epoch {self.start_epoch + 1}/{self.epochs}")
            if changed:
                print(f"--resume: changed since {os.path.basename(path)}, in effect from epoch {self.start_epoch + 1}: "
                      + ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changed.items()))

    def _trim_log(self, epochs_kept):
        """One log line per epoch: drop lines of epochs after the checkpoint (logged, then killed before the save)."""
        path = os.path.join(self.out_dir, "log.jsonl")
        if not os.path.exists(path):
            return
        keep = []
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line torn by a kill is dropped too
                    if json.loads(line).get("epoch", 0) <= epochs_kept:
                        keep.append(line.rstrip("\n") + "\n")
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)
        except OSError as e:
            raise write_error(e, path) from None

    def _diverged(self, what, epoch):
        last = os.path.join(self.out_dir, "last.pt")
        good = (f"last good checkpoint: {last} (epoch {self.saved_epoch})" if self.saved_epoch
                else "no checkpoint of this stage was saved yet")
        return UserError(f"{what} in epoch {epoch + 1}; lower --lr or check the data; nothing of this epoch was "
                         f"saved ({good})")

    def epochs_to_run(self):
        return range(self.start_epoch, self.epochs)

    def end_epoch(self, epoch, loss_sum, correct, seen, t_start, eval_model=None, extra=None):
        """Validate, log one line, write last.pt (and best.pt when validation improves). Returns the metrics.
        `extra`: the method's own numbers (name -> float), appended to the line and the JSON."""
        r, a = self.run, self.run.args
        loss_sum, correct, seen = _all_sum([float(loss_sum), float(correct), float(seen)], r.device)
        loss = loss_sum / max(seen, 1)
        if not math.isfinite(loss):
            raise self._diverged(f"training loss became {loss}", epoch)
        steps = 0 if self.select == "clean" else 10
        m = eval_model or unwrap(self.model)
        t_m = m.temperature
        m.temperature = self.temperature  # validate the model as it will be deployed
        val_clean, val_pgd = evaluate_accuracy(m, r.val_loader, a.eps, a.alpha, steps, r.autocast())
        m.temperature = t_m
        bad = count_nonfinite(m, r.val_loader)  # a NaN model is never saved, as best or as last
        if bad:
            raise self._diverged(f"the model outputs NaN/inf on {bad} validation images", epoch)
        state = {"cpu": torch.get_rng_state()}  # every rank's RNG, so a resume continues each rank's stream
        if r.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(r.device)
        states = [state]
        if dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        secs = time.time() - t_start
        # the lr of this epoch's last step (the optimizer's lr is already the next step's, one milestone on)
        lr = self.sched.base_lrs[0] * self.sched.lr_lambdas[0](max(self.sched.last_epoch - 1, 0))
        score = val_clean if self.select == "clean" else val_pgd + 1e-6 * val_clean  # ties: the cleaner model
        improved = score > self.best
        if improved:
            self.best = score
            self.best_metrics = {"best_epoch": epoch + 1, self.best_key: val_clean if steps == 0 else val_pgd}
        eta = (time.time() - self.t0) / (epoch + 1 - self.start_epoch) * (self.epochs - epoch - 1)
        metrics = {"epoch": epoch + 1, "loss": loss, "train_acc": correct / max(seen, 1), "train_on": self.train_on,
                   "val_clean": val_clean, "val_pgd10": val_pgd if steps else None, "lr": lr, "seconds": secs,
                   "images_per_s": seen / max(secs, 1e-9), "eta_s": eta, **self.best_metrics, **(extra or {})}
        if r.main:
            print(f"[{self.method}] epoch {epoch + 1}/{self.epochs}  loss {loss:.4f}  "
                  f"train ({self.train_on}) {100 * metrics['train_acc']:.2f}%  "
                  f"val clean {100 * val_clean:.2f}%" + (f"  val pgd10 {100 * val_pgd:.2f}%" if steps else "")
                  + f"  lr {lr:.4g}  {secs:.1f}s  {metrics['images_per_s']:.0f} img/s  eta {eta / 60:.1f} min"
                  + "".join(f"  {k} {v:.4g}" for k, v in (extra or {}).items()), flush=True)
            try:
                with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            except OSError as e:
                raise write_error(e, os.path.join(self.out_dir, "log.jsonl")) from None
            ckpt = make_checkpoint(self.model, a, r.info, self.method, epoch, metrics, self.temperature)
            ckpt["resumes"] = self.resumes
            if improved:
                atomic_save(ckpt, os.path.join(self.out_dir, "best.pt"))
            rng = {k: [s[k] for s in states] for k in state}
            ckpt.update(optimizer=self.opt.state_dict(), schedule=self.sched.state_dict(), rng=rng,
                        extra={k: v.state_dict() for k, v in self.extra_state.items()}, best_score=self.best)
            atomic_save(ckpt, os.path.join(self.out_dir, "last.pt"))
        self.saved_epoch = epoch + 1
        return metrics

    def finish(self):
        """Path of the checkpoint to deploy (best.pt), printed with its epoch and selection metric. Under
        torchrun every rank waits for rank 0's files."""
        if dist.is_initialized():
            dist.barrier()
        path = os.path.join(self.out_dir, "best.pt")
        if self.run.main and self.best_metrics:
            b = self.best_metrics
            print(f"[{self.method}] best.pt: epoch {b['best_epoch']}, {self.best_key[5:].replace('_', ' ')} "
                  f"{100 * b[self.best_key]:.2f}% -> {path}", flush=True)
        return path


def make_schedule(optimizer, kind, epochs, steps_per_epoch, milestones=(100, 150), gamma=0.1):
    """Per-iteration LR multiplier: piecewise (x gamma at each milestone epoch), cosine, one-cycle, constant."""
    total = max(1, epochs * steps_per_epoch)

    def factor(it):
        epoch = it / steps_per_epoch
        if kind == "piecewise":
            return gamma ** sum(epoch >= m for m in milestones)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
        if kind == "onecycle":  # linear up to the peak at 40%, then linear down to 0 (fast AT style)
            t = min(it, total) / total
            return t / 0.4 if t < 0.4 else (1 - t) / 0.6
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Defaults that depend on the dataset: a flag listed here that the user did not pass takes its value from this
# table (a method may override entries: base_parser(per_dataset=...)), otherwise the method's or the shared
# default. The method files' own defaults are the papers' CIFAR settings; MNIST gets the papernot-mnist CNN (the
# TRADES SmallCNN layout), Adam 1e-3 (as Madry et al.), no crop augmentation (as TRADES and Madry), 10 epochs
# with the lr x0.1 for the last two, and the training eps ramped up over the first epoch (README, Design notes).
DATASET_DEFAULTS = {
    "mnist": dict(arch="papernot-mnist", optimizer="adam", epochs=10, milestones=[8], eps_warmup=1,
                  augment=False, weight_decay=0.0),
}


# Defaults that depend on the arch, filled the same way after the per-dataset ones: the BatchNorm-free Papernot
# CNNs do not train with the shared SGD lr 0.1 (they sit at chance), so Adam 1e-3 without weight decay, as on MNIST.
ARCH_DEFAULTS = {arch: dict(optimizer="adam", weight_decay=0.0) for arch in ("papernot-mnist", "papernot-cifar")}


def check_eps(eps, flag="--eps"):
    """eps is in the pixel units of [0, 1] images (8/255 = 0.0314); a value written in /255 units gets a hint."""
    if not (math.isfinite(eps) and 0 <= eps <= 1):
        hint = f" (did you mean {eps:g}/255 = {eps / 255:.4f}?)" if 1 < eps <= 255 else ""
        raise UserError(f"{flag} must be >= 0 and <= 1 (pixel units of [0, 1] images), got {eps:g}{hint}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless X is None or the help already states its default."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that fills unset per-dataset and per-arch flags (DATASET_DEFAULTS, then ARCH_DEFAULTS) after
    parsing, once --dataset and --arch are known. A flag the user passes always wins."""

    def __init__(self, *a, per_dataset=None, **k):
        super().__init__(*a, **k)
        self.per_dataset = {d: {**DATASET_DEFAULTS.get(d, {}), **(per_dataset or {}).get(d, {})}
                            for d in {*DATASET_DEFAULTS, *(per_dataset or {})}}

    def parse_known_args(self, args=None, namespace=None):
        keys = {k for table in [*self.per_dataset.values(), *ARCH_DEFAULTS.values()] for k in table}
        fallback = {a.dest: a.default for a in self._actions if a.dest in keys}
        for a in self._actions:
            if a.dest in keys and a.help != argparse.SUPPRESS and "[per " not in (a.help or ""):
                marks = [f"{d}: {t[a.dest]}" for d, t in sorted(self.per_dataset.items()) if t.get(a.dest) is not None]
                marks = ["per dataset, " + "; ".join(marks)] if marks else []
                archs = [arch for arch, t in ARCH_DEFAULTS.items() if a.dest in t]  # one value for all of them
                marks += [f"per arch, {'/'.join(archs)}: {ARCH_DEFAULTS[archs[0]][a.dest]}"] if archs else []
                a.help = (a.help + " " if a.help else "") + f"[{'; '.join(marks)}]"
        # argparse leaves attributes already in the namespace alone: None there means "not given"
        ns, rest = super().parse_known_args(args, namespace or argparse.Namespace(**dict.fromkeys(keys)))
        table = self.per_dataset.get(ns.dataset, {})
        for k in sorted(keys, key=lambda k: k != "arch"):  # the arch first: it picks the per-arch entries
            if getattr(ns, k, None) is None:
                setattr(ns, k, table.get(k, ARCH_DEFAULTS.get(ns.arch, {}).get(k, fallback[k])))
        if ns.lr is None:  # Adam's usual 1e-3 unless a table or the method says otherwise
            ns.lr = 1e-3 if ns.optimizer == "adam" else 0.1
        for flag, v in (("--epochs", ns.epochs), ("--teacher-epochs", getattr(ns, "teacher_epochs", None))):
            if v is not None and v < 1:
                raise UserError(f"{flag} must be >= 1, got {v}")
        if not (math.isfinite(ns.lr) and ns.lr > 0):
            raise UserError(f"--lr must be a finite number > 0, got {ns.lr}")
        if ns.eps is not None:
            check_eps(ns.eps)
        if ns.alpha is not None and not (math.isfinite(ns.alpha) and ns.alpha > 0):
            raise UserError(f"--alpha (the attack step) must be > 0, got {ns.alpha}")
        if not ns.dist_timeout > 0:
            raise UserError(f"--dist-timeout must be > 0 seconds, got {ns.dist_timeout}")
        if ns.resume and ns.overwrite:
            raise UserError("--resume continues the run in --out-dir, --overwrite replaces it: pass one of them")
        if getattr(ns, "eps_warmup", 0) and ns.eps_warmup < 0:
            raise UserError(f"--eps-warmup must be >= 0 epochs, got {ns.eps_warmup}")
        if ns.optimizer == "sgd" and ns.nesterov and ns.momentum <= 0:
            raise UserError("--nesterov needs --momentum > 0 (or pass --no-nesterov)")
        return ns, rest


def pick_device(requested, world=1, local_rank=0):
    """The device of this process: --device, else cuda if available. On CUDA one GPU per torchrun process,
    GPU LOCAL_RANK: an explicit cuda:N would put every process on GPU N, so it is refused when world > 1."""
    cuda = torch.cuda.is_available() and requested != "cpu"
    device = torch.device(requested or ("cuda" if cuda else "cpu"))
    if device.type != "cuda":
        return device
    if device.index is not None and world > 1:
        raise UserError(f"--device {requested} under torchrun would put all {world} processes on one GPU; pass "
                        f"--device cuda (each process takes GPU LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UserError(f"no GPU cuda:{index}: this machine shows {torch.cuda.device_count()} CUDA device(s)"
                        + (" (torchrun --nproc_per_node must not exceed the GPUs)" if world > 1 else ""))
    return torch.device("cuda", index)


def native_bf16(device):
    """True where bf16 autocast is native: CUDA GPUs of compute capability 8.0 and newer (A100, RTX 30xx, H100,
    ...). Older ones (T4, V100) only emulate bf16, with no cuDNN bf16 convolutions: slower than float32, or an
    error. torch.cuda.is_bf16_supported() says True there (it counts emulation), so the capability decides."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if torch.version.hip:  # ROCm: torch knows which AMD GPUs have bf16
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device) >= (8, 0)


def precision_label(device, asked=None):
    """What a training run computes in, and why (Run.precision); `asked`: --amp / --no-amp, None if not given."""
    if asked is not None:
        return "bf16 autocast (--amp)" if asked else "float32 (--no-amp)"
    if native_bf16(device):
        return "bf16 autocast (native on this GPU)"
    if torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"float32 (no native bf16 on this GPU, compute capability {major}.{minor}; --amp forces bf16 autocast)"
    return "float32"


def predict_logits(model, x):
    """float32 logits with autocast off: correct-or-not is decided here (evaluate.py's verdict, validation)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return model(x).float()


def evaluate_accuracy(model, loader, eps, alpha, steps=10, amp=None):
    """Clean and PGD-`steps` (CE, random start) accuracy of `model` in eval mode, summed over ranks.
    The attack may run under `amp`; correct-or-not is decided in float32."""
    was_training = model.training
    model.eval()
    correct = robust = total = 0
    right = lambda v, y: (predict_logits(model, v).argmax(1) == y).sum().item()
    for x, y in loader:
        correct += right(x, y)
        if steps > 0:
            with amp or contextlib.nullcontext():
                x_adv = pgd(model, x, y, eps, alpha, steps)
            robust += right(x_adv, y)
        total += len(y)
    model.train(was_training)
    correct, robust, total = _all_sum([correct, robust, total], next(model.parameters()).device)
    return correct / max(total, 1), robust / max(total, 1)


def count_nonfinite(model, loader):
    """Images of `loader` whose float32 logits hold NaN or inf, summed over ranks. Such a model is broken:
    argmax would read its NaN logits as class 0 and score it like any other model."""
    was_training = model.training
    model.eval()
    bad = sum((~torch.isfinite(predict_logits(model, x))).any(1).sum().item() for x, _ in loader)
    model.train(was_training)
    return int(_all_sum([bad], next(model.parameters()).device)[0])


def _all_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ============================================================================================================
# 4. Data: datasets, loaders
# ============================================================================================================
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "folder", "synthetic")

# L-inf radius per dataset family. Attack steps derive from it: eps / 4 for evaluation PGD and
# 2.5 eps / steps for training PGD (Madry et al.'s rule): 2/255 on CIFAR, 1/255 on large images, 0.075 on MNIST
# (a step of 0.01 on MNIST cannot even reach the boundary of an eps = 0.3 ball in 20 steps).
THREAT = {"mnist": 0.3, "small": 8 / 255, "large": 4 / 255}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LARGE_IMAGE = 64  # folder images bigger than this stream from disk instead of living on the GPU


class DataInfo:
    """What a model and an attack need to know about a dataset."""

    def __init__(self, name, num_classes, channels, size, mean, std, flip=True, large=False, classes=None):
        self.name, self.num_classes, self.channels, self.size = name, num_classes, channels, size
        self.mean, self.std, self.flip, self.large = tuple(mean), tuple(std), flip, large
        self.classes = classes or [str(i) for i in range(num_classes)]
        self.eps = THREAT["mnist" if name == "mnist" else "large" if large else "small"]
        self.alpha = self.eps / 4  # evaluation PGD step


def synthetic_data(n_train=512, n_test=256, num_classes=10, size=32, channels=3, seed=0):
    """A small learnable image set made in memory: each class is a smooth random pattern plus strong noise.

    The per-pixel signal is weak, so a classifier must pool many pixels and (like on real images) a small
    L-inf perturbation fools an undefended model: a small CNN gets ~90% clean and ~13% under PGD at 8/255.

    No download and no disk, so tests and smoke runs can train and attack real models on it.
    Returns uint8 tensors (x_train, y_train, x_test, y_test).
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, channels, 4, 4, generator=g) * 2 - 1
    protos = F.interpolate(protos, size=size, mode="bilinear", align_corners=False)

    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = 0.5 + 0.15 * protos[y] + 0.15 * torch.randn(n, channels, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return (*draw(n_train), *draw(n_test))


def _torchvision_split(name, train, root):
    import torchvision.datasets as tvd
    try:
        if name == "svhn":
            ds = tvd.SVHN(root, split="train" if train else "test", download=True)
            return torch.from_numpy(ds.data), torch.as_tensor(ds.labels)
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[name]
        ds = cls(root, train=train, download=True)
    except Exception as e:  # no network, bad folder, corrupt archive...
        raise UserError(f"could not load {name} from '{root}' ({type(e).__name__}: {e}); "
                        f"put the files there or pass --data-dir") from None
    x = torch.as_tensor(np.asarray(ds.data))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST NHW / CIFAR NHWC -> NCHW
    return x.contiguous(), torch.as_tensor(ds.targets)


def _folder_classes(root, split):
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise UserError(f"folder dataset '{root}' has no '{split}/' directory "
                        f"(expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg)")
    classes = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
    if not classes:
        raise UserError(f"'{d}' has no class sub-directories")
    empty = [c for c in classes if not _image_files(os.path.join(d, c))]
    if empty:  # whatever its name: a class without images is never learnt (or never tested)
        raise UserError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in '{d}' hold"
                        f"{'' if len(empty) > 1 else 's'} no images; add images or remove the folder")
    return classes


def _image_files(d):
    return sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _folder_split(root, split, classes, size, skip_bad=False):
    """Decode a small-image folder split once into uint8 tensors, cached next to the data (and re-decoded
    when the file list, sizes or times change). Every file is decoded here: one that is not an image, or not
    `size` (w, h), is named in an error, or left out with `skip_bad` (--skip-bad-images)."""
    from PIL import Image
    files = [(c, f) for c in classes for f in _image_files(os.path.join(root, split, c))]
    stamp = [f"{c}/{f}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for c, f in files
             for p in [os.path.join(root, split, c, f)]]
    cache = os.path.join(root, f".robust-distill-{split}.pt")
    blob = None
    if os.path.exists(cache):
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # damaged, or not ours: never unpickled beyond tensors and plain values
            print(f"note: ignoring the unreadable dataset cache {cache}; delete it (it is rebuilt from the images)")
    if not (isinstance(blob, dict) and blob.get("classes") == classes and blob.get("stamp") == stamp):
        xs, ys, bad = [], [], []
        w, h = size
        bar = Progress(len(files), f"decoding {os.path.join(root, split)} once (then cached in {cache})")
        for bar.done, (c, f) in enumerate(files, 1):
            p = os.path.join(root, split, c, f)
            try:
                with Image.open(p) as im:
                    t = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            except Exception as e:  # zero bytes, not an image, truncated
                bad.append(f"{p} (not a readable image: {type(e).__name__})")
                continue
            if tuple(t.shape[1:]) != (h, w):
                bad.append(f"{p} ({t.shape[2]}x{t.shape[1]} px; most images are {w}x{h})")
                continue
            xs.append(t)
            ys.append(classes.index(c))
        bar.close()
        _bad_files(bad, root, split, skip_bad)
        if not xs:
            raise UserError(f"'{root}/{split}' holds no usable images")
        blob = {"x": torch.stack(xs), "y": torch.tensor(ys), "classes": classes, "stamp": stamp, "skipped": bad}
        try:
            atomic_save(blob, cache)
        except (OSError, RuntimeError, UserError):
            pass  # read-only data folder: decode again next time
    else:
        _bad_files(blob.get("skipped", []), root, split, skip_bad)
    return blob["x"], blob["y"]


def _bad_files(bad, root, split, skip_bad):
    """Refuse the unusable files of a folder split by name or, with --skip-bad-images, say which were left out."""
    if not bad:
        return
    n = f"{len(bad)} file{'s' if len(bad) > 1 else ''}"
    if not skip_bad:
        raise UserError(f"{n} in '{root}/{split}' cannot be used: {bad[0]}" + (f" and {len(bad) - 1} more"
                        if len(bad) > 1 else "") + "; fix or remove them, or pass --skip-bad-images")
    print(f"note: --skip-bad-images left out {n} of '{root}/{split}', e.g. {bad[0]}")


def _check_streamed(ds, root, split, skip_bad=False):
    """Open the header of every file of a streamed tree before training (cheap, no decoding), so that a file
    which is no image stops the run now, by name, instead of a DataLoader worker minutes into an epoch."""
    from PIL import Image
    bad = []
    bar = Progress(len(ds.samples), f"checking {root}/{split}", enabled=len(ds.samples) > 20000)
    try:
        for i, (p, _) in enumerate(ds.samples):
            try:
                with Image.open(p):
                    pass
            except Exception as e:
                bad.append(f"{p} (not a readable image: {type(e).__name__})")
            bar.done = i + 1
    finally:
        bar.close()
    _bad_files(bad, root, split, skip_bad)
    gone = {b.rsplit(" (", 1)[0] for b in bad}
    ds.samples = ds.imgs = [s for s in ds.samples if s[0] not in gone]
    ds.targets = [s[1] for s in ds.samples]


_ANNOUNCED = set()  # folder trees whose small/streamed choice was already printed


def _folder_image_size(root, classes):
    """(w, h) that most training images have, from up to ~500 files spread over all classes: the majority,
    not whichever file sorts first, decides between the small-image and the streamed path."""
    from PIL import Image
    files = [os.path.join(root, "train", c, f) for c in classes for f in _image_files(os.path.join(root, "train", c))]
    sample = files[::max(1, len(files) // 500)]
    sizes = {}
    for p in sample:
        try:
            with Image.open(p) as im:
                sizes[im.size] = sizes.get(im.size, 0) + 1
        except Exception:
            continue  # an unreadable file is named when its split is decoded or checked
    if not sizes:
        raise UserError(f"none of the {len(sample)} files sampled in '{root}/train' is a readable image")
    size = max(sizes, key=sizes.get)
    large = max(size) > LARGE_IMAGE
    if root not in _ANNOUNCED and os.environ.get("RANK", "0") == "0":
        _ANNOUNCED.add(root)
        print(f"folder {root}: {sizes[size]} of {sum(sizes.values())} sampled images are {size[0]}x{size[1]} px: "
              + ("streamed from disk at 224 px (large-image path)" if large else "held in memory (small-image path)"))
    return size, large


def load_dataset(name, data_dir=None, train=True, skip_bad=False):
    """Return (images, labels, DataInfo) for one split.

    Small-image sets come back as uint8 NCHW tensors; large folder trees as a torchvision
    ImageFolder (images=dataset, labels=None), streamed later by a DataLoader. `skip_bad`: leave out folder
    files that are not readable images (or not the tree's image size) instead of refusing them.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if name == "synthetic":
        xtr, ytr, xte, yte = synthetic_data()
        return (xtr, ytr) if train else (xte, yte), DataInfo(name, 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    if name == "folder":
        if not data_dir:
            raise UserError("--dataset folder needs --data-dir pointing at a train/ and test/ tree")
        classes = _folder_classes(data_dir, "train")
        if len(classes) < 2:
            raise UserError(f"'{data_dir}/train' has a single class folder ({classes[0]}); a classifier needs at least 2")
        if _folder_classes(data_dir, "test") != classes:
            raise UserError(f"'{data_dir}/test' and '{data_dir}/train' have different class folders")
        size, large = _folder_image_size(data_dir, classes)
        if large:
            import torchvision.datasets as tvd
            import torchvision.transforms as T
            tf = (T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()]) if train
                  else T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()]))
            ds = tvd.ImageFolder(os.path.join(data_dir, "train" if train else "test"), transform=tf)
            _check_streamed(ds, data_dir, "train" if train else "test", skip_bad)
            info = DataInfo("folder", len(classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD, large=True, classes=classes)
            return (ds, None), info
        x, y = _folder_split(data_dir, "train" if train else "test", classes, size, skip_bad)
        sample = x[::max(1, len(x) // 5000)].float() / 255  # strided: the tree is read class by class
        mean, std = tuple(sample.mean((0, 2, 3)).tolist()), tuple(sample.std((0, 2, 3)).tolist())
        return (x, y), DataInfo("folder", len(classes), x.shape[1], x.shape[2], mean, std, classes=classes)
    x, y = _torchvision_split(name, train, data_dir or "./data")
    if name == "mnist":
        info = DataInfo(name, 10, 1, 28, (0.1307,), (0.3081,), flip=False)
    else:
        info = DataInfo(name, 100 if name == "cifar100" else 10, 3, 32, CIFAR_MEAN, CIFAR_STD, flip=name != "svhn")
    return (x, y.long()), info


def augment(x, pad=4, flip=True):
    """Per-sample random crop (zero padding `pad`) and horizontal flip, on whatever device x is."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
    out = xp[torch.arange(b, device=x.device).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        out = torch.where(torch.rand(b, 1, 1, 1, device=x.device) < 0.5, out.flip(3), out)
    return out.contiguous()


class TensorLoader:
    """Batches from uint8 images held on the device; augmentation happens there too (no CPU workers).

    Under DDP each rank takes every world-th index of one shared permutation: disjoint shards
    that together cover the data. Opt-in: with `with_index = True` it yields (x, y, idx), idx the
    positions of the batch in self.x (fixed across epochs and runs), for per-sample state (InfoARD's eps_i).
    """

    def __init__(self, x, y, batch_size, device, train=False, flip=True, rank=0, world=1, seed=0, channels_last=False):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.train, self.flip, self.device = batch_size, train, flip, device
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.augment = train  # training batches are shuffled and (unless turned off) augmented
        self.progress = False  # live progress line inside each epoch (set for rank 0's training loader)
        self.with_index = False
        self.channels_last = channels_last  # NHWC float batches (Run decides: --channels-last)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indices(self):
        n = len(self.y)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            idx = torch.randperm(n, generator=g)
            idx = idx[: n - n % self.world]  # equal shard sizes keep ranks in step
        else:
            idx = torch.arange(n)
        return idx[self.rank::self.world]

    def __len__(self):
        n = len(self.indices())
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        return _with_progress(self, self._batches())

    def _batches(self):
        idx = self.indices().to(self.device)
        for i in range(len(self)):
            j = idx[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[j]
            if self.augment:
                x = augment(x, flip=self.flip)
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield (x, self.y[j], j) if self.with_index else (x, self.y[j])


class StreamLoader:
    """Large-image trees: a torchvision DataLoader with CPU workers, moving batches to the device."""

    def __init__(self, dataset, batch_size, device, train=False, workers=8, rank=0, world=1, seed=0):
        from torch.utils.data import DataLoader, DistributedSampler
        self.sampler = DistributedSampler(dataset, world, rank, shuffle=train, seed=seed) if world > 1 else None
        self.loader = DataLoader(dataset, batch_size, shuffle=train and self.sampler is None, sampler=self.sampler,
                                 num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                                 drop_last=train, persistent_workers=workers > 0)
        self.device, self.batch_size, self.epoch, self.progress = device, batch_size, 0, False

    def set_epoch(self, epoch):
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in self.loader)
        return _with_progress(self, batches)


def _with_progress(loader, batches):
    """Yield the batches; with `loader.progress` set, show a live line (images done, images/s, ETA) for the epoch."""
    if not loader.progress:
        yield from batches
        return
    bar = Progress(len(loader) * loader.batch_size, f"  epoch {loader.epoch + 1}")
    try:
        for i, batch in enumerate(batches):
            yield batch
            bar.done = (i + 1) * loader.batch_size
    finally:
        bar.close()


def make_loader(data, info, batch_size, device, train=False, workers=8, rank=0, world=1, seed=0, channels_last=False):
    x, y = data
    if y is None:
        return StreamLoader(x, batch_size, device, train, workers, rank, world, seed)
    return TensorLoader(x, y, batch_size, device, train, info.flip, rank, world, seed, channels_last)


@contextlib.contextmanager
def rank0_first():
    """Under torchrun, rank 0 runs the block first (a download, an extraction, a cache file) while the other
    ranks wait at a barrier, then they run it on the files rank 0 left: no two processes write one archive."""
    ranked = dist.is_initialized() and dist.get_world_size() > 1
    if ranked and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if ranked and dist.get_rank() == 0:
            dist.barrier()


def get_loaders(args, device, rank=0, world=1):
    """Train / validation / test loaders and DataInfo. Validation = `--val-size` held-out training images."""
    skip = getattr(args, "skip_bad_images", False)
    with rank0_first():
        (x, y), info = load_dataset(args.dataset, args.data_dir, train=True, skip_bad=skip)
        test, _ = load_dataset(args.dataset, args.data_dir, train=False, skip_bad=skip)
    n = len(x) if y is not None else len(x.samples)
    if args.val_size < 1:
        raise UserError("--val-size must be at least 1 (the best checkpoint is chosen on these images)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    val_size = min(args.val_size, n // 5)
    if val_size < args.val_size and rank == 0:
        print(f"note: --val-size {args.val_size} is too large for {n} training images; using {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # fixed split, any training seed
    train_size = getattr(args, "train_size", None)
    if train_size is not None:  # N of the rest, drawn with the run's seed (the hold-out stays the same)
        if not 1 <= train_size <= n - val_size:
            raise UserError(f"--train-size must be between 1 and {n - val_size} (the {n} training images of "
                            f"{args.dataset} minus {val_size} held out for validation), got {train_size}")
        rest = perm[val_size:][torch.randperm(n - val_size, generator=torch.Generator().manual_seed(args.seed))]
        perm = torch.cat([perm[:val_size], rest[:train_size]])
    if y is None:  # streamed tree: keep its own order, validation on a subset of the test transform
        from torch.utils.data import Subset
        (val_ds, _), _ = load_dataset(args.dataset, args.data_dir, train=False, skip_bad=skip)
        val_ds.samples = [x.samples[i] for i in perm[:val_size].tolist()]
        val_ds.targets = [s[1] for s in val_ds.samples]
        train, val = (Subset(x, perm[val_size:].tolist()), None), (val_ds, None)
    else:
        train, val = (x[perm[val_size:]], y[perm[val_size:]]), (x[perm[:val_size]], y[perm[:val_size]])
    mk = lambda d, tr: make_loader(d, info, args.batch_size, device, tr, args.workers, rank, world, args.seed,
                                   bool(getattr(args, "channels_last", False)))
    train_loader = mk(train, True)
    train_loader.augment = getattr(args, "augment", True)
    train_loader.progress = rank == 0
    if len(train_loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(perm) - val_size} training images"
                        + (f" per process ({world} processes)" if world > 1 else ""))
    return train_loader, mk(val, False), mk(test, False), info


# ============================================================================================================
# 5. Architectures and their memory
# ============================================================================================================
class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv with a residual; used by PreAct-ResNet-18 and (TRADES layout) WRN."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        sc = self.shortcut(o) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(o)))) + sc


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(o)) + self.shortcut(x))


class ResNet18(Classifier):
    """CIFAR ResNet-18 (3x3 stem, no max-pool); `preact=True` gives PreActResNet-18 (Rice et al. 2020).
    Stages: 64@s, 128@s/2, 256@s/4, 512@s/8; pooled 512."""

    def __init__(self, num_classes, in_channels, mean, std, preact=False):
        super().__init__(mean, std)
        block = PreActBlock if preact else BasicBlock
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(512 if preact else 64)  # pre-act: final BN before pooling
        widths, layers, cin = (64, 128, 256, 512), [], 64
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(block(cin, w, 1 if i == 0 else 2), block(w, w, 1)))
            cin = w
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(512, num_classes)

    def body(self, x):
        o = self.conv1(x) if self.preact else F.relu(self.bn1(self.conv1(x)))
        stages = []
        for layer in self.layers:
            o = layer(o)
            stages.append(o)
        if self.preact:
            o = stages[-1] = F.relu(self.bn1(o))
        pooled = F.adaptive_avg_pool2d(o, 1).flatten(1)
        return self.fc(pooled), stages, pooled


class WideResNet(Classifier):
    """WRN-D-K in the TRADES/AWP layout: conv 16 -> 3 groups (16K, 32K, 64K) -> BN-ReLU -> pool -> fc.
    Stages: 16K@s, 32K@s/2, 64K@s/4 (the last after the final BN-ReLU); pooled 64K."""

    def __init__(self, depth, widen, num_classes, in_channels, mean, std):
        super().__init__(mean, std)
        if (depth - 4) % 6:
            raise UserError(f"wrn depth must be 6n+4 (10, 16, 28, 34, ...), got {depth}")
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.blocks = nn.ModuleList(
            nn.Sequential(*[PreActBlock(w[i] if j == 0 else w[i + 1], w[i + 1], (1 if i == 0 else 2) if j == 0 else 1)
                            for j in range(n)]) for i in range(3))
        self.bn = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def body(self, x):
        o, stages = self.conv1(x), []
        for blk in self.blocks:
            o = blk(o)
            stages.append(o)
        o = stages[-1] = F.relu(self.bn(o))
        pooled = F.adaptive_avg_pool2d(o, 1).flatten(1)
        return self.fc(pooled), stages, pooled


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        mid = expansion * cin
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(Classifier):
    """MobileNetV2, CIFAR variant (stride-1 stem, stride 1 in the second group, as in the RSLAD/ARD code).
    Stages: 24@s, 32@s/2, 96@s/4, 1280@s/8; pooled 1280."""
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    TAPS = (2, 5, 12)  # block indices whose outputs are the first three stage maps

    def __init__(self, num_classes, in_channels, mean, std):
        super().__init__(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(True))
        blocks, cin = [], 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, t, s if i == 0 else 1))
                cin = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(True))
        self.fc = nn.Linear(1280, num_classes)

    def body(self, x):
        o, stages = self.stem(x), []
        for i, blk in enumerate(self.blocks):
            o = blk(o)
            if i in self.TAPS:
                stages.append(o)
        o = self.head(o)
        stages.append(o)
        pooled = F.adaptive_avg_pool2d(o, 1).flatten(1)
        return self.fc(pooled), stages, pooled


class PapernotCNN(Classifier):
    """The CNNs of Papernot et al. 2016, Table I: conv-conv-pool-conv-conv-pool (3x3, 'valid' padding as in
    Carlini's reproduction), FC-FC, FC. MNIST: 32-32-64-64 / 200-200; CIFAR: 64-64-128-128 / 256-256. Dropout 0.5
    after both hidden FC layers is our reading of Table II (Carlini's code and the TRADES SmallCNN: the first only).
    Stages: the two pooled maps; pooled = second FC layer's activations."""
    fixed_size = True

    def __init__(self, widths, fc, num_classes, in_channels, size, mean, std, dropout=0.5):
        super().__init__(mean, std)
        a, b = widths
        self.features1 = nn.Sequential(nn.Conv2d(in_channels, a, 3), nn.ReLU(), nn.Conv2d(a, a, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.features2 = nn.Sequential(nn.Conv2d(a, b, 3), nn.ReLU(), nn.Conv2d(b, b, 3), nn.ReLU(), nn.MaxPool2d(2))
        side = ((size - 4) // 2 - 4) // 2
        if side < 1:
            raise UserError(f"papernot CNNs need images of at least 16 pixels, got {size}")
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(b * side * side, fc), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(fc, fc), nn.ReLU(), nn.Dropout(dropout))
        self.out = nn.Linear(fc, num_classes)
        # Kaiming-normal weights and zero biases on the convolutions and the hidden FC layers (the TRADES SmallCNN:
        # on its convolutions only, and a zero last layer). PyTorch's default init (uniform, gain 1/sqrt(3) of
        # Kaiming's) shrinks the activations ~25x over these six plain ReLU layers: the logits start nearly
        # constant and SGD 0.01 sits at chance for hundreds of steps (README, per-dataset defaults).
        for m in [*self.features1, *self.features2, *self.fc]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def body(self, x):
        s1 = self.features1(x)
        s2 = self.features2(s1)
        pooled = self.fc(s2)
        return self.out(pooled), [s1, s2], pooled


class TorchvisionNet(Classifier):
    """An ImageNet network from torchvision.models, for images of IMAGENET_STEM_FROM px and up: ResNets with the
    stride-2 7x7 stem and max-pool, MobileNetV2 with its stride-2 3x3 stem; each downsamples 32x in all.
    Stages: the four ResNet layer outputs (resnet18: 64@s/4, 128@s/8, 256@s/16, 512@s/32; resnet50 and
    wide_resnet50_2: 256, 512, 1024, 2048 at the same strides), or MobileNetV2's 24@s/4, 32@s/8, 96@s/16,
    1280@s/32 (the channels our CIFAR variant pairs); pooled 512, 2048 or 1280."""
    MOBILENET_TAPS = (3, 6, 13, 18)  # torchvision's mobilenet_v2 `features[i]` whose outputs are the stage maps

    def __init__(self, name, num_classes, in_channels, mean, std, pretrained=False):
        super().__init__(mean, std)
        import torchvision.models as tvm
        if in_channels != 3:
            raise UserError(f"{name} (torchvision) takes RGB images, got {in_channels} channel(s)")
        if not pretrained:
            self.net = tvm.get_model(name, weights=None, num_classes=num_classes)
            return
        try:  # torchvision downloads the weights once, into $TORCH_HOME (default ~/.cache/torch)
            self.net = tvm.get_model(name, weights=tvm.get_model_weights(name).DEFAULT)
        except Exception as e:  # no network, proxy, corrupt file...
            why = (str(e).splitlines() or [""])[0][:160]
            raise UserError(f"--pretrained: could not get torchvision's ImageNet weights for {name} "
                            f"({type(e).__name__}: {why}); connect to the network once or drop --pretrained") from None
        head = self.net.classifier if hasattr(self.net, "classifier") else None
        if head is not None:  # a fresh classifier for our classes; the rest keeps the ImageNet weights
            head[-1] = nn.Linear(head[-1].in_features, num_classes)
        else:
            self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)

    def body(self, x):
        n, stages = self.net, []
        if hasattr(n, "features"):  # MobileNetV2
            for i, block in enumerate(n.features):
                x = block(x)
                if i in self.MOBILENET_TAPS:
                    stages.append(x)
            pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return n.classifier(pooled), stages, pooled  # classifier = dropout 0.2 + linear, as torchvision's
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            stages.append(x)
        pooled = n.avgpool(x).flatten(1)
        return n.fc(pooled), stages, pooled


def activation_bytes(model, shape):
    """(leaf outputs, saved for backward): bytes that ONE image of `shape` (C, H, W) costs in a float32 forward
    of `model` in its current mode, input requiring grad (as in an attack). Leaf outputs = the sum of every leaf
    module's output size; saved = what autograd keeps for the backward pass, each storage once, weights and
    buffers excluded. Both grow linearly with the batch. Train mode moves BatchNorm statistics: use a copy."""
    device = next(model.parameters()).device
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    outputs, saved = [0], {}

    def count_output(module, inputs, out):
        outputs[0] += sum(t.numel() * t.element_size() for t in (out if isinstance(out, (tuple, list)) else [out])
                          if torch.is_tensor(t))

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [m.register_forward_hook(count_output) for m in model.modules() if next(m.children(), None) is None]
    try:
        x = torch.rand(1, *shape, device=device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device.type, enabled=False):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs[0], sum(saved.values())


# How a batch size is derived from activation_bytes (README, "Memory"): of a GPU's memory, 90% minus GPU_RESERVE
# (CUDA context, cuDNN workspace) minus the weights (x4 when training: weights, gradients, SGD momentum, one more
# copy for AWP's proxy or a teacher) holds the activations, counted as PEAK_PER_SAVED x the saved bytes per image,
# twice per batch element when training ([x; x'] or TRADES's two forwards). A real step's peak of live tensors
# measured 1.0-1.25x the saved bytes (tests.memory --peak: the backward's transient gradients, the attack's copies
# of the input); 1.5 leaves room for the allocator's fragmentation.
GPU_RESERVE, PEAK_PER_SAVED = 1 << 30, 1.5


def batch_that_fits(saved_per_image, n_params, gpu_bytes, train=False):
    """Largest float32 batch size for a GPU of `gpu_bytes` by the rule above (0 if not even one image fits)."""
    free = 0.9 * gpu_bytes - GPU_RESERVE - 4 * n_params * (4 if train else 1)
    return max(int(free // (PEAK_PER_SAVED * saved_per_image * (2 if train else 1))), 0)


# ============================================================================================================
# 6. Infrastructure: checkpoints, output folders, progress
# ============================================================================================================
CHECKPOINT_FORMAT = "robust-distill/1"


def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else [_plain(i) for i in v] if isinstance(v, (list, tuple)) else str(v)


def make_checkpoint(model, args, info, method, epoch, metrics, temperature=1.0):
    """The checkpoint dict that evaluate.py and --teacher read (plain types and tensors only: loadable with
    weights_only=True)."""
    m = unwrap(model)
    # contiguous: a channels_last run writes the same plain NCHW tensors as any other
    return {"format": CHECKPOINT_FORMAT, "model": {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
            "arch": getattr(m, "arch", args.arch), "imagenet_stem": bool(getattr(m, "imagenet_stem", False)),
            "dataset": args.dataset, "num_classes": info.num_classes,
            "in_channels": info.channels, "image_size": info.size, "temperature": float(temperature),
            "method": method, "args": {k: _plain(v) for k, v in vars(args).items()}, "epoch": epoch,
            "metrics": {k: _plain(v) for k, v in metrics.items()}}


def load_checkpoint(path):
    """Read a checkpoint safely (weights_only=True). Any failure is our own one-line UserError naming the reason
    (missing, empty, truncated, not a torch file, or refused because loading it would run code)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is not a robust-distill checkpoint: the file is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text would advise weights_only=False, i.e. running the file's code
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's archive format
        why = ("refused because loading it would run code (it holds Python objects, not only tensors and plain "
               "values); nothing was loaded" if "GLOBAL" in str(e) else
               "the file is truncated or damaged (an incomplete torch.save archive)" if zipped else
               "not a file written by torch.save (or a damaged one)")
        raise UserError(f"{path} is not a robust-distill checkpoint: {why}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def build_model_from_checkpoint(path_or_ckpt, device="cpu"):
    """Rebuild exactly the deployed model (eval mode, checkpoint temperature). Returns (model, checkpoint)."""
    ckpt = load_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, str) else path_or_ckpt
    name = path_or_ckpt if isinstance(path_or_ckpt, str) else "the checkpoint"
    missing = [k for k in ("model", "arch", "dataset", "num_classes", "method", "args", "epoch", "metrics") if k not in ckpt]
    missing += [f"model.{k}" for k in ("mean", "std") if not missing and k not in ckpt["model"]]
    if missing:
        raise UserError(f"{name} is not a complete {CHECKPOINT_FORMAT} checkpoint: it lacks {', '.join(missing)}")
    state = ckpt["model"]
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt.get("in_channels", 3), ckpt.get("image_size", 32),
                        state["mean"].flatten().tolist(), state["std"].flatten().tolist(),
                        imagenet_stem=ckpt.get("imagenet_stem", False))  # no field: one of our CIFAR definitions
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"checkpoint weights do not fit arch '{ckpt['arch']}': "
                        f"{(lines[1:] or lines or [type(e).__name__])[0][:200]}") from None
    model.temperature = float(ckpt.get("temperature", 1.0))
    return model.to(device).eval(), ckpt


def atomic_save(obj, path):
    """torch.save to a temporary file next to `path`, then rename: a crash never leaves a half file, and a
    failed write (a full disk, ...) is one line (UserError) while the previous file at `path` stays intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise write_error(e, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_error(e, path):
    """A failed write of `path` as a UserError; a full disk says so (torch.save reports it as a stream error)."""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    full = getattr(e, "errno", None) == errno.ENOSPC
    if not full and isinstance(e, RuntimeError):
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(d).free < 2 ** 20
    why = (f"no space left on {d}" if full else getattr(e, "strerror", None)
           or (str(e).splitlines() or [type(e).__name__])[0][:200])
    kept = "; the previous file is intact" if os.path.isfile(path) and path.endswith(".pt") else ""
    return UserError(f"could not write {path}: {why}{kept}")


def check_writable_dir(d, what):
    """Fail fast: `d` must be an existing directory that takes a new file (a probe file is written and deleted)."""
    if not os.path.isdir(d):
        raise UserError(f"{what}: the directory {d} does not exist")
    probe = os.path.join(d, f".write-test.tmp{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what}: {write_error(e, d)}") from None


RUN_FILES = ("best.pt", "last.pt", "log.jsonl")  # what makes a directory hold a run


def default_out_dir(method, args):
    """runs/<method>-<dataset>-<arch>, plus what sets this run apart when given: -seed<N>, -eps<E>."""
    return os.path.join("runs", f"{method}-{args.dataset}-{args.arch}" + (f"-seed{args.seed}" if args.seed else "")
                        + (f"-eps{args.eps:.4g}" if args.eps is not None else ""))


def claim_out_dir(args):
    """Make --out-dir this run's own before any work: a writable directory, locked by this process (a lock file
    with its PID; one whose process is gone is taken over). A previous run's files there (or in teacher/, unless
    --teacher names a checkpoint to reuse) stop the command unless --resume continues them or --overwrite deletes them."""
    d = args.out_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise UserError(f"--out-dir {d} is a file, not a directory")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise write_error(e, d) from None
    _lock(d)  # creating the lock file also proves the directory writable
    dirs = [d] if getattr(args, "teacher", None) else [d, os.path.join(d, "teacher")]
    found = [os.path.join(x, f) for x in dirs for f in RUN_FILES if os.path.exists(os.path.join(x, f))]
    if found and not args.resume:
        names = ", ".join(os.path.relpath(f, d) for f in found)
        if not args.overwrite:
            raise UserError(f"{d} already holds a run ({names}); pass --resume to continue it, --overwrite to "
                            f"replace it, or another --out-dir")
        for f in found:
            os.remove(f)
        print(f"--overwrite: deleted the previous run's {names} in {d}")


def _lock(d):
    path = os.path.join(d, ".lock")
    try:
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _lock_pid(path)
                if pid not in (None, os.getpid()) and _alive(pid):
                    raise UserError(f"{d} is in use by a running process (PID {pid}, see {path}); let it finish, "
                                    f"or pass another --out-dir") from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)  # its process is gone (or it is ours): take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            atexit.register(_unlock, path)
            return
    except OSError as e:
        raise write_error(e, path) from None


def _lock_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _unlock(path):
    if _lock_pid(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.remove(path)


def _alive(pid):
    if os.name != "posix":
        return False  # no harmless probe elsewhere: a lock or temporary file is then taken over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_tmp(d):
    """Delete the `*.tmp<pid>` files a killed atomic_save left in `d` (their process is gone)."""
    for f in os.listdir(d):
        head, _, pid = f.rpartition(".tmp")
        if head and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(d, f))


def exit_with_launcher():
    """Under torchrun on Linux: the kernel stops this worker (SIGTERM) when the launcher dies, so a killed
    launcher leaves no orphan workers training on and writing into the out-dir."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died just before
        os.kill(os.getpid(), signal.SIGTERM)


PROGRESS_EVERY = 30.0  # seconds between plain progress lines when stdout is not a terminal (logs, CI)


def _clock(s):
    return "?" if not math.isfinite(s) else f"{int(s) // 3600}:{int(s) % 3600 // 60:02d}:{int(s) % 60:02d}"


class Progress:
    """One live status line for long work (an evaluation, a training epoch), drawn by a background thread:
    rewritten in place about once a second on a terminal, a plain line every PROGRESS_EVERY seconds
    otherwise. The caller only sets `.done` (units finished) and `.note` (what runs now). No-op if not enabled."""

    live = set()  # bars still drawing; run_main closes them before it prints an error

    def __init__(self, total, label, unit="images", enabled=True):
        self.total, self.label, self.unit, self.done, self.note = total, label, unit, 0, ""
        self.enabled, self.tty, self.t0, self.width = enabled, sys.stdout.isatty(), time.time(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True) if enabled else None
        if self._thread:
            Progress.live.add(self)
            self._thread.start()

    @classmethod
    def close_all(cls):
        for bar in list(cls.live):
            bar.close()

    def line(self):
        elapsed = time.time() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"{self.label}: {self.done}/{self.total} {self.unit}  {rate:.1f} {self.unit}/s  elapsed "
                f"{_clock(elapsed)}  eta {_clock(eta)}" + (f"  {self.note}" if self.note else ""))

    def _loop(self):
        while not self._stop.wait(1.0 if self.tty else PROGRESS_EVERY):
            self._draw()

    def _draw(self):
        text = self.line()
        if self.tty:
            sys.stdout.write("\r" + text.ljust(self.width))
            self.width = len(text)
            sys.stdout.flush()
        else:
            print(text, flush=True)

    def close(self):
        """Stop drawing; on a terminal, wipe the line so the next print starts clean."""
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None
            Progress.live.discard(self)
            if self.tty and self.width:
                sys.stdout.write("\r" + " " * self.width + "\r")
                sys.stdout.flush()
