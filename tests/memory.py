"""Activation memory per image of each architecture, and the batch sizes that fit a 24 GB and an 80 GB GPU.

    python -m tests.memory                                   # the README table (CPU, float32, about a minute)
    python -m tests.memory --archs resnet18,wide_resnet50_2 --sizes 224 --peak    # + measured peaks (minutes)

Per arch and image size, on the CPU, with the real model in float32 and one image (common.activation_bytes):
  outputs  the sum of every leaf module's output size in one forward;
  saved    what autograd keeps for the backward pass (each storage once, weights excluded): the part of a
           step's memory that grows with the batch.
--peak also measures (for the definition each size gets by default), in a fresh process per batch size, how much the process's peak memory grows per image
between two batch sizes, for a real evaluation step (evaluate.apgd, 3 iterations) and a real training step
(at_alp.py's loss at its defaults: PGD-2, one joint [x; x'] forward, backward, SGD step); peak / saved is what
common.PEAK_PER_SAVED rounds up. The batch columns come from common.batch_that_fits.
"""
import argparse
import resource
import subprocess
import sys

import torch

import common

ARCHS = ("resnet18", "preact-resnet18", "wrn-34-10", "mobilenetv2", "resnet50", "wide_resnet50_2", "mobilenet_v2")
GB, MIB = 10 ** 9, 2 ** 20


def peak_child(arch, size, mode, batch):
    """Run one real step at `batch` and print this process's peak resident memory in bytes."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = common.build_model(arch, 10, 3, size)
    x, y = torch.rand(batch, 3, size, size), torch.randint(10, (batch,))
    if mode == "eval":
        import evaluate
        evaluate.apgd(model.eval(), x, y, 8 / 255, n_iter=3)
    else:
        import at_alp
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss, _ = at_alp.at_alp_loss(model.train(), x, y, 8 / 255, 2 / 255, 2)
        loss.backward()
        opt.step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def peak_per_image(arch, size, mode):
    """Growth of the peak memory per image between two batch sizes (fresh processes; in a training step each
    batch element is two images, x and x')."""
    small, big = (2, 6) if size > 64 else (16, 48)
    peaks = []
    for b in (small, big):
        out = subprocess.run([sys.executable, "-m", "tests.memory", "--child", arch, str(size), mode, str(b)],
                             capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.split()[-1]))
    return (peaks[1] - peaks[0]) / ((big - small) * (2 if mode == "train" else 1))


def measure(arch, size, peak=False):
    model = common.build_model(arch, 10, 3, size)
    n_params = sum(p.numel() for p in model.parameters())
    outputs, saved = common.activation_bytes(model.eval(), (3, size, size))
    row = {"arch": arch, "size": size, "imagenet_stem": model.imagenet_stem, "params_m": n_params / 1e6,
           "outputs_mib": outputs / MIB, "saved_mib": saved / MIB}
    if peak and model.imagenet_stem == (size >= common.IMAGENET_STEM_FROM):  # not CIFAR stems on large images
        row["eval_peak_mib"] = peak_per_image(arch, size, "eval") / MIB
        row["train_peak_mib"] = peak_per_image(arch, size, "train") / MIB
    for gb in (24, 80):
        row[f"eval_{gb}"] = common.batch_that_fits(saved, n_params, gb * GB)
        row[f"train_{gb}"] = common.batch_that_fits(saved, n_params, gb * GB, train=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--sizes", default="32,224")
    p.add_argument("--peak", action="store_true", help="also measure the peak per image of real steps (slow)")
    p.add_argument("--child", nargs=4, metavar=("ARCH", "SIZE", "MODE", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return peak_child(a.child[0], int(a.child[1]), a.child[2], int(a.child[3]))
    torch.set_num_threads(1)
    rows = []
    print("| arch | px | network | params | leaf outputs / image | saved for backward / image"
          + (" | peak / image: eval, train" if a.peak else "")
          + " | 24 GB: train, eval | 80 GB: train, eval |")
    print("|---|---|---|---|---|---|" + ("---|" if a.peak else "") + "---|---|")
    for arch in a.archs.split(","):
        for size in map(int, a.sizes.split(",")):
            try:
                r = measure(arch, size, a.peak)
            except common.UserError as e:
                print(f"| {arch} | {size} | refused: {str(e).split(':')[0]} |", flush=True)
                continue
            rows.append(r)
            net = ("torchvision ImageNet" if r["imagenet_stem"] else "ours, CIFAR stem")
            peak = "" if not a.peak else " | not measured" if "eval_peak_mib" not in r else \
                f" | {r['eval_peak_mib']:.1f}, {r['train_peak_mib']:.1f} MiB"
            print(f"| {arch} | {size} | {net} | {r['params_m']:.1f} M | {r['outputs_mib']:.1f} MiB | "
                  f"{r['saved_mib']:.1f} MiB{peak} | {r['train_24']}, {r['eval_24']} | {r['train_80']}, {r['eval_80']} |",
                  flush=True)
    return rows


if __name__ == "__main__":
    common.run_main(main)
