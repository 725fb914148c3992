"""Speed of one PGD-10 adversarial-training step: the typical fp32 loop vs this project's path vs --compile.

    python -m tests.bench                                   # resnet18 and wrn-34-10, batch 128, on the GPU
    python -m tests.bench --archs resnet18 --steps-measured 100 --json bench.json
    python -m tests.bench --device cpu --archs wrn-10-1 --n 256 --batch-size 32 --steps-measured 2 \\
        --modes typical,default                             # smoke test, seconds on a laptop

Every mode runs the same training step: PGD-10 (eps 8/255, step 2/255, cross-entropy, uniform random
start) with BatchNorm in eval mode, then cross-entropy on x_adv in train mode, backward, SGD step.
What differs is the engineering around it:
  typical  how reference code usually does it: fp32, NCHW, a torchvision DataLoader over PIL images with
           RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor on CPU workers (pin_memory), the
           attack written inline, cudnn.benchmark off (PyTorch's default);
  default  exactly what common.Run gives every method script: uint8 images on the device, crop and flip
           there (common.TensorLoader), common.pgd, bf16 autocast (GPUs with native bf16), channels_last,
           cudnn.benchmark;
  compile  default + torch.compile of the model (the scripts' --compile flag).
Images are random uint8 (speed does not depend on content). Warm-up steps are not timed; on CUDA the
clock is read after torch.cuda.synchronize(). Seconds per epoch = n / (images per second), training
steps only (the per-epoch validation of common.Trainer adds a PGD-10 pass over --val-size images).
One process, one device: launch it without torchrun.
"""
import argparse
import contextlib
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import common

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
MODES = ("typical", "default", "compile")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archs", default="resnet18,wrn-34-10", help="comma-separated, any of common.ARCHS")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n", type=int, default=50000, help="images per epoch (CIFAR-10's training set)")
    p.add_argument("--steps-measured", type=int, default=50, help="timed training steps per arch and mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, cudnn autotuning)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the typical mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.archs, args.modes = args.archs.split(","), args.modes.split(",")
    if bad := [m for m in args.modes if m not in MODES]:
        raise common.UserError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if min(args.batch_size, args.steps_measured, args.n) < 1 or args.n < args.batch_size:
        raise common.UserError("--batch-size, --steps-measured and --n must be >= 1, and --n >= --batch-size")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise common.UserError("tests.bench measures one device: run it without torchrun")
    return args


# ------------------------------------------------------------------------ the typical reference loop
class PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: HWC uint8 -> PIL image -> transform."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).contiguous().numpy(), y.tolist(), transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def typical_batches(x, y, batch_size, device, workers):
    import torchvision.transforms as T
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    loader = torch.utils.data.DataLoader(PILImages(x, y, tf), batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    while True:
        for xb, yb in loader:
            yield xb.to(device), yb.to(device)


def typical_pgd(model, x, y, eps, alpha, steps):
    """PGD as reference repositories usually write it inline."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), [x_adv])
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


# ------------------------------------------------------------------------------- shared machinery
def device_batches(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def make_step(model, train_model, opt, sched, attack, autocast):
    def step(x, y):
        model.eval()  # BN statistics frozen while attacking
        with autocast():
            x_adv = attack(train_model, x, y)
        model.train()
        with autocast():
            loss = F.cross_entropy(train_model(x_adv).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        return loss.detach()
    return step


def images_per_s(step, batches, batch_size, warmup, measured, device):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(*next(batches))
    sync()
    t = time.perf_counter()
    for _ in range(measured):
        loss = step(*next(batches))
    sync()
    secs = time.perf_counter() - t
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss became {loss.item()} during the benchmark")
    return measured * batch_size / secs


def bench_one(arch, mode, x, y, args, tmp):
    device = torch.device(args.device)
    if mode == "typical":
        torch.backends.cudnn.benchmark = False
        model = common.build_model(arch, 10).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        step = make_step(model, model, opt, None, lambda m, xb, yb: typical_pgd(m, xb, yb, EPS, ALPHA, STEPS),
                         contextlib.nullcontext)
        batches = typical_batches(x, y, args.batch_size, device, args.workers)
    else:  # the method scripts' own path, built by the same common.Run calls they make
        argv = ["--dataset", "synthetic", "--arch", arch, "--batch-size", str(args.batch_size), "--val-size", "64",
                "--device", args.device, "--out-dir", tmp] + (["--compile"] if mode == "compile" else [])
        run = common.Run(common.base_parser("bench", epochs=1).parse_args(argv), "bench")
        loader = common.make_loader((x, y), run.info, args.batch_size, run.device, train=True,
                                    channels_last=run.channels_last)
        model = run.model()
        train_model = run.prepare(model)
        opt, sched = run.optimizer(model.parameters(), steps_per_epoch=len(loader))
        step = make_step(model, train_model, opt, sched,
                         lambda m, xb, yb: common.pgd(m, xb, yb, EPS, ALPHA, STEPS), run.autocast)
        batches = device_batches(loader)
    try:
        return images_per_s(step, batches, args.batch_size, args.warmup, args.steps_measured, device)
    finally:
        batches.close()  # stops DataLoader workers
        if mode == "compile":
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    args = get_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"PGD-{STEPS} adversarial-training step | {name} | torch {torch.__version__} | batch {args.batch_size} | "
          f"epoch = {args.n} images | {args.steps_measured} steps timed after {args.warmup} warm-up")
    print(f"{'arch':<12} {'mode':<8} {'images/s':>10} {'s/epoch':>9} {'vs typical':>11}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            base = None
            for mode in args.modes:
                ips = bench_one(arch, mode, x, y, args, tmp)
                base = ips if mode == "typical" else base
                row = {"arch": arch, "mode": mode, "images_per_s": ips, "s_per_epoch": args.n / ips,
                       "speedup_vs_typical": ips / base if base else None}
                rows.append(row)
                ratio = f"{row['speedup_vs_typical']:.2f}x" if base else "-"
                print(f"{arch:<12} {mode:<8} {ips:>10.1f} {row['s_per_epoch']:>9.2f} {ratio:>11}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "batch_size": args.batch_size, "n": args.n,
                       "steps_measured": args.steps_measured, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    common.run_main(main)
