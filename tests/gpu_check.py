"""A 10-minute check of this repository on one CUDA GPU, prepared to run unattended: one call, every figure in
one JSON file and one markdown table.

    python -m tests.gpu_check --out gpu_check.json --data-dir CIFAR10_TREE   # writes gpu_check.json + gpu_check.md
    python -m tests.gpu_check --dry-run                                       # the plan and its time budget, no GPU

CIFAR10_TREE is CIFAR-10 as an image-folder tree (TREE/train/<class>/*.png|jpg, TREE/test/<class>/*); without
--data-dir the training and attack steps use the synthetic set (numbers then say nothing about CIFAR-10).
Steps, in order, each in its own process with its own time limit (a step that runs over is stopped and
recorded as such; what it printed or wrote until then is kept, and the next step starts):
  env             the GPU, its compute capability and memory, torch / CUDA / cuDNN versions, the precision a
                  training run picks there (common.Run.precision);
  tests           the test files that exercise the GPU code path, on CUDA (ROBUST_DISTILL_TEST_DEVICE=cuda):
                  tests/test_gpu_path.py and tests/test_large_models.py; counts of passed and failed tests;
  memory          measured peak GPU memory per image of one AT+ALP training step and one APGD step, torchvision
                  resnet18 and mobilenet_v2 at 224 px in float32, against the README's rule (common.batch_that_fits);
  bench-resnet18, bench-wrn-34-10
                  tests.bench: images/s and s/epoch of a PGD-10 training step, modes typical, default, compile;
  train           PGD-AT ResNet-18 (at_alp.py --alp 0 --at 0 --w-clean 0 --w-adv 1), TRAIN_EPOCHS epochs,
                  one-cycle schedule, the scripts' default GPU path; per epoch: seconds, images/s, validation
                  clean and PGD-10 accuracy;
  aa-lite-fp32, aa-lite-amp
                  evaluate.py --preset standard (APGD-CE + APGD-T) on a fixed 1,000 test images of that
                  checkpoint, float32 and with --amp (bf16 attack gradients, float32 decisions);
  autoattack      the official AutoAttack code (fra31/auto-attack or pyautoattack; only when importable), the
                  same two attacks (version "custom", apgd-ce + apgd-t) on the same 1,000 images, float32.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 600  # the whole check, on one modern GPU (A100 / H100 class)
TRAIN_EPOCHS, EVAL_N = 3, 1000
TEST_FILES = ["tests/test_gpu_path.py", "tests/test_large_models.py"]


def plan(work, data_dir=None):
    """[(name, seconds allowed, command, what it measures)]; `--step NAME` commands run a function of this file."""
    py = sys.executable
    data = ["--dataset", "folder", "--data-dir", data_dir] if data_dir else ["--dataset", "synthetic"]
    ckpt = os.path.join(work, "pgdat", "best.pt")
    bench = lambda arch: [py, "-m", "tests.bench", "--device", "cuda", "--archs", arch, "--steps-measured", "20",
                          "--warmup", "3", "--json", os.path.join(work, f"bench-{arch}.json")]
    aa = lambda tag, extra: [py, "evaluate.py", ckpt, "--preset", "standard", "--n", str(EVAL_N), "--device", "cuda",
                             "--quiet", "--json", os.path.join(work, f"aa-lite-{tag}.json")] + extra
    return [
        ("env", 15, [py, "-m", "tests.gpu_check", "--step", "env"], "GPU, versions, training precision"),
        ("tests", 90, [py, "-m", "pytest", "-q", "-rf"] + TEST_FILES,
         "GPU-path tests on CUDA"),
        ("memory", 25, [py, "-m", "tests.gpu_check", "--step", "memory"], "peak memory per image vs the rule"),
        ("bench-resnet18", 65, bench("resnet18"), "PGD-10 training speed, 3 modes"),
        ("bench-wrn-34-10", 75, bench("wrn-34-10"), "PGD-10 training speed, 3 modes"),
        ("train", 125, [py, "at_alp.py", *data, "--arch", "resnet18", "--alp", "0", "--at", "0", "--w-clean", "0",
                        "--w-adv", "1", "--epochs", str(TRAIN_EPOCHS), "--schedule", "onecycle", "--device", "cuda",
                        "--workers", "4", "--out-dir", os.path.join(work, "pgdat")], "PGD-AT ResNet-18"),
        ("aa-lite-fp32", 85, aa("fp32", []), f"AA-lite on {EVAL_N} test images, float32"),
        ("aa-lite-amp", 50, aa("amp", ["--amp"]), f"AA-lite on {EVAL_N} test images, bf16 gradients"),
        ("autoattack", 60, [py, "-m", "tests.gpu_check", "--step", "autoattack", "--checkpoint", ckpt]
         + (["--data-dir", data_dir] if data_dir else []), "official AutoAttack (apgd-ce + apgd-t), same images"),
    ]


# ------------------------------------------------------------------------------ steps run in a child process
def step_env():
    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(dev)
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 1e9, 1),
            "gpus_visible": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "native_bf16": common.native_bf16(dev),
            "training_precision": common.precision_label(dev)}


def step_memory():
    """Peak allocated bytes per image of a real training and attack step vs PEAK_PER_SAVED x the saved count."""
    import at_alp
    import evaluate
    dev, out = torch.device("cuda"), {}
    torch.backends.cudnn.benchmark = False
    for arch, batch in (("resnet18", 32), ("mobilenet_v2", 16)):
        model = common.build_model(arch, 10, 3, 224).to(dev)
        _, saved = common.activation_bytes(model.eval(), (3, 224, 224))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.rand(batch, 3, 224, 224, device=dev), torch.randint(10, (batch,), device=dev)

        def train_step():
            loss, _ = at_alp.at_alp_loss(model.train(), x, y, 4 / 255, 1 / 255, 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def peak_of(fn):
            fn()  # the first call creates momentum buffers and cuDNN workspaces
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            fn()
            torch.cuda.synchronize(dev)
            return torch.cuda.max_memory_allocated(dev) - base

        train = peak_of(train_step) / (2 * batch)  # [x; x'] joint forward: two images per batch element
        attack = peak_of(lambda: evaluate.apgd(model.eval(), x, y, 4 / 255, n_iter=3)) / batch
        out[arch] = {"batch": batch, "saved_mib": saved / 2 ** 20, "predicted_mib": common.PEAK_PER_SAVED * saved / 2 ** 20,
                     "train_peak_mib": train / 2 ** 20, "attack_peak_mib": attack / 2 ** 20}
        del model, opt, x, y
        torch.cuda.empty_cache()
    return out


def step_autoattack(checkpoint, data_dir):
    import evaluate
    from tests import compare_autoattack
    if evaluate.official_autoattack() is None:
        return {"skipped": "the official AutoAttack package is not importable (pip install pyautoattack)"}
    dev = torch.device("cuda")
    model, ck = common.build_model_from_checkpoint(checkpoint, dev)
    (xs, ys), info = common.load_dataset(ck["dataset"], data_dir or ck["args"].get("data_dir"), train=False)
    n = min(EVAL_N, len(ys))  # evaluate.py's --n subset: the same images as the AA-lite steps
    idx = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))[:n] if n < len(ys) else torch.arange(n)
    x, y = (xs[idx].float() / 255).to(dev), ys[idx].to(dev)
    with evaluate.strict_float32():
        t = time.time()
        robust = compare_autoattack.official(model, x, y, info.eps, 500, info.num_classes)
    return {"n": n, "robust_acc": robust.float().mean().item(), "seconds": time.time() - t}


# ------------------------------------------------------------------------------------------ the driver
def run_step(argv, seconds, log_path, env=None):
    """Run argv with a time limit; on timeout stop its whole process group. Returns (status, seconds, output)."""
    t = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env=dict(os.environ, **(env or {})))
        try:
            status = "ok" if p.wait(timeout=seconds) == 0 else f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            status = f"stopped at its {seconds} s limit"
    with open(log_path) as f:
        return status, time.time() - t, f.read()


def figures(name, output, work):
    """The numbers of one step, from what it printed or wrote (also after a timeout)."""
    if name in ("env", "memory", "autoattack"):
        lines = [l for l in output.splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    if name == "tests":
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", output)}
        if not counts:  # stopped before pytest's summary: count its progress characters
            marks = "".join(re.findall(r"^([.FEsx]+)(?: +\[ *\d+%\])?$", output, re.M))
            counts = {"passed": marks.count("."), "failed": marks.count("F") + marks.count("E")}
        return {**counts, "failed_tests": re.findall(r"^FAILED (\S+)", output, re.M)}
    if name.startswith("bench-"):  # rows as tests.bench prints them: arch mode images/s s/epoch ratio
        rows = re.findall(r"^(\S+)\s+(typical|default|compile)\s+([\d.]+)\s+([\d.]+)", output, re.M)
        return {f"{mode} images/s": float(ips) for _, mode, ips, _ in rows} | \
            {f"{mode} s/epoch": float(spe) for _, mode, _, spe in rows}
    if name == "train":
        path = os.path.join(work, "pgdat", "log.jsonl")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            epochs = [json.loads(line) for line in f]
        return {f"epoch {e['epoch']}": {k: e[k] for k in ("seconds", "images_per_s", "val_clean", "val_pgd10")}
                for e in epochs}
    if name.startswith("aa-lite-"):
        path = os.path.join(work, f"{name}.json")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            r = json.load(f)
        return {"n": r["n"], "clean_acc": r["clean_acc"], "robust_acc": r["robust_acc"],
                "seconds": sum(r["seconds"].values()), "precision": r["precision"]}
    return {}


def markdown(result):
    lines = [f"GPU check: {result.get('gpu', '?')}, torch {result.get('torch', '?')}, "
             f"{result['total_seconds']:.0f} s of a {BUDGET_S} s budget", "",
             "| step | figure | value | status | seconds |", "|---|---|---|---|---|"]
    for s in result["steps"]:
        flat = []
        for k, v in s["figures"].items():
            for kk, vv in (v.items() if isinstance(v, dict) else [("", v)]):
                flat.append((f"{k} {kk}".strip(), f"{vv:.4g}" if isinstance(vv, float) else str(vv)))
        for i, (k, v) in enumerate(flat or [("", "")]):
            lines.append(f"| {s['name'] if i == 0 else ''} | {k} | {v} | {s['status'] if i == 0 else ''} | "
                         f"{'%.0f' % s['seconds'] if i == 0 else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON report; the markdown table goes next to it (.md)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 as an image-folder tree (default: synthetic data)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its time budget, run nothing")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a step that runs inside a child process
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step:
        fn = {"env": step_env, "memory": step_memory,
              "autoattack": lambda: step_autoattack(a.checkpoint, a.data_dir)}[a.step]
        print(json.dumps(fn()), flush=True)
        return None
    work = os.path.abspath(os.path.join("runs", time.strftime("gpu_check-%Y%m%d-%H%M%S")))  # checkpoints, logs
    steps = plan(work, a.data_dir and os.path.abspath(a.data_dir))
    total = sum(s[1] for s in steps)
    print(f"GPU check plan ({total} s of step limits, budget {BUDGET_S} s; work files in {work}):")
    for name, seconds, argv_, what in steps:
        print(f"  {name:<16}{seconds:>4} s  {what}: {' '.join('python' if x == sys.executable else x for x in argv_)}")
    if a.dry_run:
        return steps
    if not torch.cuda.is_available():
        raise common.UserError("tests.gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); "
                               "--dry-run prints the plan without one")
    os.makedirs(work)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)  # fail now, not after ten minutes
    result, t0 = {"plan_seconds": total, "budget_seconds": BUDGET_S, "data": a.data_dir or "synthetic", "steps": []}, time.time()
    for name, seconds, argv_, what in steps:
        if name.startswith(("aa-lite", "autoattack")) and not os.path.exists(os.path.join(work, "pgdat", "best.pt")):
            result["steps"].append({"name": name, "what": what, "status": "skipped: no checkpoint from train",
                                    "seconds": 0.0, "figures": {}})
            continue
        print(f"[{time.time() - t0:5.0f} s] {name} (at most {seconds} s) ...", flush=True)
        env = {"ROBUST_DISTILL_TEST_DEVICE": "cuda"} if name == "tests" else None
        status, secs, output = run_step(argv_, seconds, os.path.join(work, f"{name}.log"), env)
        try:
            figs = figures(name, output, work)
        except (ValueError, KeyError) as e:
            figs = {"unreadable": f"{type(e).__name__}: {e}"}
        result["steps"].append({"name": name, "what": what, "status": status, "seconds": secs, "figures": figs,
                                "command": argv_, "output_tail": output[-2000:]})
        if name == "env":
            result.update({k: figs.get(k) for k in ("gpu", "torch")})
        print(f"         {status}, {secs:.0f} s: {json.dumps(figs)[:300]}", flush=True)
    result["total_seconds"] = time.time() - t0
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(result))
    print(f"wrote {a.out} and {md} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    common.run_main(main)
