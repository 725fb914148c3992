"""Shared plumbing for the robust-distill method scripts: data, models, the PGD attack, training utilities.

Every method file (defensive_distillation.py, ltd.py, at_alp.py, infoard.py) imports this module and
nothing else of ours. Read it once; after that each method file reads on its own.

Conventions used everywhere:
  * images are float tensors in [0, 1], NCHW; normalisation is the first layer of every model, so
    attacks and epsilons live in pixel space (the RobustBench convention);
  * `model(x)` returns logits divided by `model.temperature` (1 unless a checkpoint says otherwise);
    `model(x, return_features=True)` returns `(logits, {"stages": [maps...], "pooled": vector})`;
  * user mistakes raise `UserError`, which the scripts print as one line instead of a traceback.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "robust-distill/1"


class UserError(Exception):
    """A problem with the user's input (bad flag, missing file, ...): shown as one clear line."""


def run_main(main_fn, argv=None):
    """Call `main_fn(argv)`, turning UserError into a one-line message and exit status 2."""
    try:
        return main_fn(argv)
    except UserError as e:
        Progress.close_all()  # no live progress line drawing over the message
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        Progress.close_all()


##############################################################################################
#                                           Data                                             #
##############################################################################################
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "folder", "synthetic")
# L-inf radius per dataset family (SPEC section 4). Attack steps derive from it: eps / 4 for evaluation PGD and
# 2.5 eps / steps for training PGD (Madry et al.'s rule): 2/255 on CIFAR, 1/255 on large images, 0.075 on MNIST
# (SPEC's MNIST step of 0.01 cannot even reach the boundary of an eps = 0.3 ball in 20 steps).
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
    return classes


def _image_files(d):
    return sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _folder_split(root, split, classes):
    """Decode a small-image folder split once into uint8 tensors, cached next to the data (and re-decoded
    when the file list, sizes or times change)."""
    from PIL import Image
    files = [(c, f) for c in classes for f in _image_files(os.path.join(root, split, c))]
    stamp = [f"{c}/{f}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for c, f in files
             for p in [os.path.join(root, split, c, f)]]
    cache = os.path.join(root, f".robust-distill-{split}.pt")
    if os.path.exists(cache):
        blob = torch.load(cache, weights_only=True)
        if blob["classes"] == classes and blob.get("stamp") == stamp:
            return blob["x"], blob["y"]
    xs, ys = [], []
    for c, f in files:
        with Image.open(os.path.join(root, split, c, f)) as im:
            xs.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        ys.append(classes.index(c))
    if not xs or len({tuple(t.shape) for t in xs}) != 1:
        raise UserError(f"'{root}/{split}' is empty or its images differ in size")
    x, y = torch.stack(xs), torch.tensor(ys)
    try:
        atomic_save({"x": x, "y": y, "classes": classes, "stamp": stamp}, cache)
    except (OSError, RuntimeError):
        pass  # read-only data folder: decode again next time
    return x, y


def _first_image_size(root, classes):
    from PIL import Image
    d = os.path.join(root, "train", classes[0])
    files = _image_files(d)
    if not files:
        raise UserError(f"'{d}' holds no images")
    with Image.open(os.path.join(d, files[0])) as im:
        return max(im.size)


def load_dataset(name, data_dir=None, train=True):
    """Return (images, labels, DataInfo) for one split.

    Small-image sets come back as uint8 NCHW tensors; large folder trees as a torchvision
    ImageFolder (images=dataset, labels=None), streamed later by a DataLoader.
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
        if _folder_classes(data_dir, "test") != classes:
            raise UserError(f"'{data_dir}/test' and '{data_dir}/train' have different class folders")
        if _first_image_size(data_dir, classes) > LARGE_IMAGE:
            import torchvision.datasets as tvd
            import torchvision.transforms as T
            tf = (T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()]) if train
                  else T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()]))
            ds = tvd.ImageFolder(os.path.join(data_dir, "train" if train else "test"), transform=tf)
            info = DataInfo("folder", len(classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD, large=True, classes=classes)
            return (ds, None), info
        x, y = _folder_split(data_dir, "train" if train else "test", classes)
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


def get_loaders(args, device, rank=0, world=1):
    """Train / validation / test loaders and DataInfo. Validation = `--val-size` held-out training images."""
    (x, y), info = load_dataset(args.dataset, args.data_dir, train=True)
    test, _ = load_dataset(args.dataset, args.data_dir, train=False)
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
    if train_size is not None:  # the first N of the same fixed permutation after the hold-out: seeded, nested
        if not 1 <= train_size <= n - val_size:
            raise UserError(f"--train-size must be between 1 and {n - val_size} (the {n} training images of "
                            f"{args.dataset} minus {val_size} held out for validation), got {train_size}")
        perm = perm[:val_size + train_size]
    if y is None:  # streamed tree: keep its own order, validation on a subset of the test transform
        from torch.utils.data import Subset
        (val_ds, _), _ = load_dataset(args.dataset, args.data_dir, train=False)
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


##############################################################################################
#                                          Models                                            #
##############################################################################################
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
    Carlini's reproduction), FC-FC with dropout 0.5, FC. MNIST: 32-32-64-64 / 200-200; CIFAR: 64-64-128-128 / 256-256.
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
        # Kaiming-normal weights and zero biases (as the TRADES SmallCNN). PyTorch's default init (uniform,
        # gain 1/sqrt(3) of Kaiming's) shrinks the activations ~25x over these six plain ReLU layers: the logits
        # start nearly constant and SGD 0.01 sits at chance for hundreds of steps (README, per-dataset defaults).
        for m in [*self.features1, *self.features2, *self.fc]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def body(self, x):
        s1 = self.features1(x)
        s2 = self.features2(s1)
        pooled = self.fc(s2)
        return self.out(pooled), [s1, s2], pooled


ARCHS = ("preact-resnet18", "resnet18", "wrn-D-K", "mobilenetv2", "papernot-mnist", "papernot-cifar")
# Each arch's natural input (channels, size, mean, std) when build_model is not told: MNIST's for papernot-mnist,
# CIFAR's for the rest.
NATURAL_INPUT = {"papernot-mnist": (1, 28, (0.1307,), (0.3081,))}


def build_model(arch, num_classes, in_channels=None, image_size=None, mean=None, std=None):
    """Build an architecture by name (see ARCHS; wrn-D-K means e.g. wrn-34-10, wrn-28-10, wrn-10-1).

    Unset input arguments take the arch's natural input (1x28x28 for papernot-mnist, else 3x32x32). The
    model refuses inputs of another shape with a one-line ValueError."""
    c, size, m, s = NATURAL_INPUT.get(arch, (3, 32, CIFAR_MEAN, CIFAR_STD))
    in_channels, image_size = in_channels or c, image_size or size
    model = _build(arch, num_classes, in_channels, image_size, mean or m, std or s)
    model.arch = arch  # recorded in checkpoints, so a teacher of another arch is rebuilt correctly
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


def model_for(arch, info):
    return build_model(arch, info.num_classes, info.channels, info.size, info.mean, info.std)


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


def attention_map(fmap, size=None):
    """Attention Transfer map (Zagoruyko & Komodakis 2017) of a (B, C, H, W) activation: channel mean of
    squares (sign-free, so pre-activation sums work too), optionally average-pooled to `size` (to compare
    stages of different resolution), flattened, unit L2 norm per sample: *where* the network looks."""
    a = fmap.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


##############################################################################################
#                                         Attacks                                            #
##############################################################################################
def cw_margin_loss(logits, y):
    """Per-sample CW margin, maximised by the attacker: max_{i != y} z_i - z_y (> 0 means misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - z_y


def dlr_loss(logits, y):
    """Per-sample DLR loss of Croce & Hein 2020 (maximised): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)."""
    z = logits.float()
    zs = z.sort(1, descending=True).values
    return cw_margin_loss(z, y) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Targeted DLR (maximised): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    z = logits.float()
    zs = z.sort(1, descending=True).values
    z_y, z_t = z.gather(1, y[:, None]).squeeze(1), z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def _per_sample(v, x):
    """A float or a (B,) tensor as something that broadcasts over x."""
    if torch.is_tensor(v):
        if v.dim() != 1 or len(v) != len(x):
            raise ValueError(f"per-sample value must have shape ({len(x)},), got {tuple(v.shape)}")
        return v.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return float(v)


def pgd(model, x, y, eps, alpha, steps, loss="ce", random_start=True, targeted=False, target=None):
    """L-infinity projected gradient ascent on `loss`; returns x_adv (detached, in [0,1], |x_adv - x| <= eps).

    model:  any callable; its output goes to the loss (logits for the built-in losses). The caller
            chooses train/eval mode. Gradients are taken w.r.t. the perturbation only.
    eps, alpha: floats, or (B,) tensors for per-sample strength (InfoARD's adaptive attack).
    loss:   'ce' (cross-entropy on y), 'cw' (logit margin), 'kl' (KL(target || softmax(output)),
            `target` a probability matrix, TRADES-style), or a callable(output, y) -> per-sample losses.
    random_start: True for U(-eps, eps), 'normal' for 0.001 N(0, 1) (TRADES), False for none.
    targeted: move towards class y instead of away from it (descend the CE).
    """
    if steps < 0 or (not torch.is_tensor(eps) and eps < 0):
        raise ValueError("pgd needs steps >= 0 and eps >= 0")
    if loss == "kl" and target is None:
        raise ValueError("loss='kl' needs target probabilities")
    eps_b, alpha_b = _per_sample(eps, x), _per_sample(alpha, x)
    x = x.detach()
    if random_start == "normal":
        delta = 0.001 * torch.randn_like(x)
    elif random_start:
        delta = (torch.rand_like(x) * 2 - 1) * eps_b
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x)
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
            delta = delta + alpha_b * grad.sign()
            delta = torch.max(torch.min(delta, eps_b), -eps_b) if torch.is_tensor(eps_b) else delta.clamp(-eps_b, eps_b)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


##############################################################################################
#                                    Training plumbing                                       #
##############################################################################################
# Defaults that depend on the dataset. The method files' own defaults are the papers' CIFAR settings; on MNIST
# those do not fit (WRN/ResNet for 28x28 digits, 200 epochs). A flag listed here that the user did not pass
# takes its value from this table (a method may override entries: base_parser(per_dataset=...)), otherwise
# the method's or the shared default. MNIST: the papernot-mnist CNN (the TRADES SmallCNN layout), Adam 1e-3
# (as Madry et al.; it beat SGD 0.01 by 55% to 37% PGD-20 accuracy after 234 PGD-AT steps, README), no
# crop augmentation (TRADES and Madry use none), 10 epochs with the lr x0.1 for the last two (TRADES trains
# 100 with SGD; Adam gets most of the way in a few epochs; 10 PGD-10 PGD-AT epochs take ~35 min on 2 CPU cores),
# and the training eps ramped up over the first epoch.
DATASET_DEFAULTS = {
    "mnist": dict(arch="papernot-mnist", optimizer="adam", epochs=10, milestones=[8], eps_warmup=1,
                  augment=False, weight_decay=0.0),
}
# Defaults that depend on the arch, filled the same way after the per-dataset ones. The Papernot CNNs have no
# BatchNorm, and the shared SGD lr 0.1 does not train them: natural training of papernot-cifar on the synthetic
# set, 48 steps of batch 64, stays at chance (7% clean) with SGD 0.1 momentum 0.9 and reaches 77% with Adam 1e-3;
# under TRADES (ltd.py) SGD's loss jumps to 20 in the first epoch and the network then sits at chance. So Adam
# 1e-3 without weight decay, as on MNIST.
ARCH_DEFAULTS = {arch: dict(optimizer="adam", weight_decay=0.0) for arch in ("papernot-mnist", "papernot-cifar")}


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
            if a.dest in keys and "[per " not in (a.help or ""):
                marks = [f"{d}: {t[a.dest]}" for d, t in sorted(self.per_dataset.items()) if a.dest in t]
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
        if getattr(ns, "eps_warmup", 0) and ns.eps_warmup < 0:
            raise UserError(f"--eps-warmup must be >= 0 epochs, got {ns.eps_warmup}")
        if ns.optimizer == "sgd" and ns.nesterov and ns.momentum <= 0:
            raise UserError("--nesterov needs --momentum > 0 (or pass --no-nesterov)")
        return ns, rest


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
    s.add_argument("--milestones", type=int, nargs="*", default=[100, 150], help="piecewise: epochs where lr *= gamma")
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
    s.add_argument("--out-dir", default=None, help="default: runs/<method>-<dataset>-<arch>")
    s.add_argument("--workers", type=int, default=8, help="CPU loader workers (large-image folders only)")
    s.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on any device (default: on for CUDA, off for CPU)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for models and batches (default: on for CUDA, off for CPU)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    s.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.set_defaults(**defaults)
    return p


class Run:
    """Everything about one training run that is not the method: device, ranks, data, logging, files."""

    def __init__(self, args, method):
        self.args, self.method = args, method
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and args.device != "cpu"
        self.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", local)  # one GPU per torchrun process (set_device needs an index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        seed_everything(args.seed + self.rank)
        # The GPU path is one decision each, on any device (the CPU runs it with --amp --channels-last);
        # the resolved values go back into args, so every checkpoint records the precision it trained in.
        gpu = self.device.type == "cuda"
        self.amp = args.amp = gpu if args.amp is None else args.amp
        self.channels_last = args.channels_last = gpu if args.channels_last is None else args.channels_last
        self.train_loader, self.val_loader, self.test_loader, self.info = get_loaders(args, self.device, self.rank, self.world)
        teacher_arch = None if getattr(args, "teacher", None) else getattr(args, "teacher_arch", None)
        for arch in {args.arch, teacher_arch or args.arch}:  # a bad --arch / --teacher-arch fails now, not after a stage
            arch_features(arch, self.info)
        args.eps = self.info.eps if args.eps is None else args.eps
        args.alpha = 2.5 * args.eps / max(args.steps, 1) if args.alpha is None else args.alpha
        args.out_dir = args.out_dir or os.path.join("runs", f"{method}-{args.dataset}-{args.arch}")
        if self.main:
            os.makedirs(args.out_dir, exist_ok=True)

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
        return self.to_device(model_for(arch or self.args.arch, self.info))

    def prepare(self, model):
        """Wrap for training: DistributedDataParallel under torchrun, torch.compile with --compile."""
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


def unwrap(model):
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def average_gradients(module):
    """All-reduce and average .grad of `module` across ranks (for helper models DDP does not wrap)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def _all_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


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


def atomic_save(obj, path):
    """torch.save to a temporary file next to `path`, then rename: a crash never leaves a half file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else [_plain(i) for i in v] if isinstance(v, (list, tuple)) else str(v)


def make_checkpoint(model, args, info, method, epoch, metrics, temperature=1.0):
    """The checkpoint dict of SPEC section 3 (plain types and tensors only: loadable with weights_only=True)."""
    m = unwrap(model)
    # contiguous: a channels_last run writes the same plain NCHW tensors as any other
    return {"format": CHECKPOINT_FORMAT, "model": {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
            "arch": getattr(m, "arch", args.arch), "dataset": args.dataset, "num_classes": info.num_classes,
            "in_channels": info.channels, "image_size": info.size, "temperature": float(temperature),
            "method": method, "args": {k: _plain(v) for k, v in vars(args).items()}, "epoch": epoch,
            "metrics": {k: _plain(v) for k, v in metrics.items()}}


def load_checkpoint(path):
    """Read a checkpoint safely (weights_only=True), with a clear error for missing or foreign files."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def build_model_from_checkpoint(path_or_ckpt, device="cpu"):
    """Rebuild exactly the deployed model (eval mode, checkpoint temperature). Returns (model, checkpoint)."""
    ckpt = load_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, str) else path_or_ckpt
    state = ckpt["model"]
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt.get("in_channels", 3), ckpt.get("image_size", 32),
                        state["mean"].flatten().tolist(), state["std"].flatten().tolist())
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit arch '{ckpt['arch']}': {str(e).splitlines()[0][:200]}") from None
    model.temperature = float(ckpt.get("temperature", 1.0))
    return model.to(device).eval(), ckpt


def load_teacher(path, run):
    """A frozen teacher from any checkpoint of this project: eval mode, no gradients, temperature 1 (the
    method applies its own temperature explicitly); refuses a checkpoint made for other data."""
    ck = load_checkpoint(path)
    if ck["dataset"] != run.args.dataset or ck["num_classes"] != run.info.num_classes:
        raise UserError(f"teacher {path} is for {ck['dataset']} ({ck['num_classes']} classes), "
                        f"not {run.args.dataset} ({run.info.num_classes} classes)")
    teacher, _ = build_model_from_checkpoint(ck, run.device)
    teacher.temperature = 1.0
    return run.to_device(teacher).eval().requires_grad_(False)


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
        if run.main:
            os.makedirs(self.out_dir, exist_ok=True)
            a, m = run.args, unwrap(model)
            print(f"[{method}] start{f' stage {stage}' if stage else ''}: arch {getattr(m, 'arch', a.arch)}, dataset "
                  f"{a.dataset}, device {run.device}{f' x{run.world}' if run.world > 1 else ''}, "
                  f"{'bf16 autocast' if run.amp else 'float32'}{', channels_last' if run.channels_last else ''}, "
                  f"{self.epochs} epoch{'s' * (self.epochs != 1)}, out-dir {self.out_dir}", flush=True)
        if run.args.resume:
            self._resume()

    @property
    def done(self):
        return self.start_epoch >= self.epochs

    def _resume(self):
        path = os.path.join(self.out_dir, "last.pt")
        if not os.path.exists(path):
            if self.run.main:
                print(f"--resume: no {path} yet, starting from scratch")
            return
        ckpt = load_checkpoint(path)
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["schedule"])
        for name, obj in self.extra_state.items():
            try:
                obj.load_state_dict(ckpt["extra"][name])
            except (KeyError, RuntimeError) as e:
                raise UserError(f"{path} was written by a run with other settings ({name}: {type(e).__name__}); "
                                f"resume with the same flags or use another --out-dir") from None
        torch.set_rng_state(ckpt["rng"])
        self.start_epoch, self.best = ckpt["epoch"] + 1, ckpt.get("best_score", -1.0)
        self.best_metrics = {k: ckpt["metrics"][k] for k in ("best_epoch", self.best_key) if k in ckpt["metrics"]}
        if self.run.main:
            print(f"resumed from {path}: continuing at epoch {self.start_epoch + 1}/{self.epochs}")

    def epochs_to_run(self):
        return range(self.start_epoch, self.epochs)

    def end_epoch(self, epoch, loss_sum, correct, seen, t_start, eval_model=None, extra=None):
        """Validate, log one line, write last.pt (and best.pt when validation improves). Returns the metrics.
        `extra`: the method's own numbers (name -> float), appended to the line and the JSON."""
        r, a = self.run, self.run.args
        loss_sum, correct, seen = _all_sum([float(loss_sum), float(correct), float(seen)], r.device)
        loss = loss_sum / max(seen, 1)
        if not math.isfinite(loss):
            raise UserError(f"training loss became {loss} in epoch {epoch + 1}; lower --lr or check the data "
                            f"(last good checkpoint: {os.path.join(self.out_dir, 'last.pt')})")
        steps = 0 if self.select == "clean" else 10
        m = eval_model or unwrap(self.model)
        t_m = m.temperature
        m.temperature = self.temperature  # validate the model as it will be deployed
        val_clean, val_pgd = evaluate_accuracy(m, r.val_loader, a.eps, a.alpha, steps, r.autocast())
        m.temperature = t_m
        secs = time.time() - t_start
        lr = self.opt.param_groups[0]["lr"]
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
            with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            ckpt = make_checkpoint(self.model, a, r.info, self.method, epoch, metrics, self.temperature)
            if improved:
                atomic_save(ckpt, os.path.join(self.out_dir, "best.pt"))
            ckpt.update(optimizer=self.opt.state_dict(), schedule=self.sched.state_dict(), rng=torch.get_rng_state(),
                        extra={k: v.state_dict() for k, v in self.extra_state.items()}, best_score=self.best)
            atomic_save(ckpt, os.path.join(self.out_dir, "last.pt"))
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
