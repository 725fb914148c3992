"""Activation memory per image of each architecture, and the batch sizes that fit a 24 GB and an 80 GB GPU.

    python -m tests.memory                                   # the README table (CPU, float32, a few minutes)
    python -m tests.memory --peak                            # + measured peaks of real steps (much longer)

Per arch and image size, on the CPU, with the real model in float32 and one image (common.activation_bytes):
  outputs  the sum of every leaf module's output size in one forward;
  saved    what autograd keeps for the backward pass (each storage once, weights excluded): the part of a
           step's memory that grows with the batch.
--peak also measures, for the definition each size gets by default, how much the peak of live tensor memory
grows per image between two batch sizes (torch.profiler's record of every allocation and free), in a real
evaluation step (evaluate.apgd, 3 iterations) and a real training step (at_alp.py's loss at its defaults:
PGD-2, one joint [x; x'] forward, backward, SGD step). common.PEAK_PER_SAVED is peak / saved, rounded up with
room for the allocator's fragmentation. The batch columns come from common.batch_that_fits.
"""
import argparse

import torch

import common

ARCHS = ("resnet18", "preact-resnet18", "wrn-34-10", "mobilenetv2", "resnet50", "wide_resnet50_2", "mobilenet_v2")
GB, MIB = 10 ** 9, 2 ** 20


def step_peak(arch, size, mode, batch):
    """Peak bytes of live tensors in one real step at `batch`, from the step's start (every allocation and free
    of the CPU allocator, as torch.profiler records them): what a GPU's caching allocator must hold, before its
    fragmentation and cuDNN's workspace."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = common.build_model(arch, 10, 3, size)
    x, y = torch.rand(batch, 3, size, size), torch.randint(10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        if mode == "eval":
            import evaluate
            evaluate.apgd(model.eval(), x, y, 8 / 255, n_iter=3)
        else:
            import at_alp
            loss, _ = at_alp.at_alp_loss(model.train(), x, y, 8 / 255, 2 / 255, 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    step()  # the first step creates the momentum buffers
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_per_image(arch, size, mode):
    """Growth of a step's peak per image between two batch sizes (in a training step each batch element is two
    images, x and x')."""
    small, big = (2, 6) if size > 64 else (8, 24)
    grow = step_peak(arch, size, mode, big) - step_peak(arch, size, mode, small)
    return grow / ((big - small) * (2 if mode == "train" else 1))


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
    a = p.parse_args(argv)
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
