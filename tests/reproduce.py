"""Reproduce the results table: each family's baseline and method, same data, arch, budget and seed, all
evaluated alike (AA-lite = `evaluate.py --preset standard`, with `--diagnose`).

    python -m tests.reproduce --dataset cifar10 --data-dir data/cifar10 --arch resnet18 --epochs 30 \\
        --train-args "--milestones 15 23" --n 1000                           # a GPU; see the README
    python -m tests.reproduce --dataset mnist --data-dir DIR --train-size 10000 --epochs 2 \\
        --n 500 --diagnose-n 200 --device cpu                                # a CPU (DIR: torchvision MNIST)
    python -m tests.reproduce --dataset synthetic --arch wrn-10-1 --epochs 1 ...    # a smoke test (tests/)

Families (--families, comma list; each is a baseline and a method trained by the same script):
  pgdat    PGD-AT  (at_alp.py --alp 0 --at 0 --w-clean 0 --w-adv 1)   and AT+ALP  (at_alp.py)
  trades   TRADES-AWP (ltd.py --no-distill)                           and LTD     (ltd.py --teacher <TRADES-AWP>)
  distill  RSLAD (infoard.py --asa off --mim logit --teacher T)       and InfoARD (infoard.py --w-kl 0.1 --teacher T)
  dd       its T=1 control (--temperature 1)                          and defensive distillation (MNIST/synthetic)
RSLAD and InfoARD share one teacher T: --teacher, or by default the TRADES-AWP run's best.pt (trained here
even when the trades family is not asked for).

Files in --out-dir: runs/<name>/ (the script's own --out-dir; DONE marks a finished training), eval/<name>.json
(evaluate.py's report), results.md (the table for the README) and results.json.
Resume: run the same command again. A run with best.pt and DONE is reused as it is; a run started but not
finished continues with --resume; an evaluation whose JSON exists is reused (a retrained run is re-evaluated).
"""
import argparse
import gc
import importlib
import json
import os
import shlex
import time

import torch
import torch.nn.functional as F

import common
import evaluate

STEPS = 10  # training PGD steps of every script (for the time estimate)
# name, family, label, script, flags ({trades} / {teacher}: checkpoint paths), passes per training image
RUNS = [
    ("pgd-at", "pgdat", "PGD-AT", "at_alp", "--alp 0 --at 0 --w-clean 0 --w-adv 1", STEPS + 1),
    ("at-alp", "pgdat", "AT+ALP", "at_alp", "", STEPS + 2),
    ("trades-awp", "trades", "TRADES-AWP", "ltd", "--no-distill", STEPS + 4),
    ("ltd", "trades", "LTD", "ltd", "--teacher {trades}", STEPS + 4.3),
    ("rslad", "distill", "RSLAD", "infoard", "--asa off --mim logit --teacher {teacher}", STEPS + 2.3),
    ("infoard", "distill", "InfoARD", "infoard", "--w-kl 0.1 --teacher {teacher}", 2 * STEPS + 2.3),  # RSLAD's KL scale
    ("dd-t1", "dd", "DD control (T=1)", "defensive_distillation", "--temperature 1", 2.3),
    ("dd", "dd", "Defensive distillation (T=100)", "defensive_distillation", "", 2.3),
]
FAMILIES = ("pgdat", "trades", "distill", "dd")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(common.DATASETS)}")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--arch", default=None, help="every run's arch (default: papernot-mnist on MNIST, else resnet18)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of every training (and of each DD stage)")
    p.add_argument("--train-size", type=int, default=None, help="passed on to every script when given")
    p.add_argument("--families", default=None, help=f"comma list from {', '.join(FAMILIES)} (default: all; dd only "
                                                    f"on mnist/synthetic)")
    p.add_argument("--teacher", default=None, help="RSLAD/InfoARD teacher (default: the TRADES-AWP run's best.pt)")
    p.add_argument("--out-dir", default=None, help="default: reproduce-<dataset>-<arch>")
    p.add_argument("--n", type=int, default=1000, help="test images for AA-lite (fixed random subset)")
    p.add_argument("--diagnose-n", type=int, default=500, help="test images for the masking diagnostics")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-args", default="", help="extra flags for every training script, e.g. \"--batch-size 256\"")
    p.add_argument("--eval-args", default="", help="extra flags for evaluate.py, e.g. \"--apgd-iters 20\"")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    a = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise common.UserError("run tests.reproduce without torchrun (it calls the scripts one after another)")
    a.arch = a.arch or ("papernot-mnist" if a.dataset == "mnist" else "resnet18")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.out_dir = a.out_dir or f"reproduce-{a.dataset}-{a.arch}"
    dd_ok = a.dataset in ("mnist", "synthetic")
    fams = a.families.split(",") if a.families else [f for f in FAMILIES if f != "dd" or dd_ok]
    if bad := [f for f in fams if f not in FAMILIES]:
        raise common.UserError(f"unknown famil{'ies' if len(bad) > 1 else 'y'} {bad}; choose from {', '.join(FAMILIES)}")
    if "dd" in fams and not dd_ok:
        raise common.UserError(f"the dd family runs on mnist or synthetic only, not {a.dataset}")
    if a.teacher and not os.path.isfile(a.teacher):
        raise common.UserError(f"--teacher {a.teacher}: no such file")
    if min(a.epochs, a.n, a.diagnose_n) < 1 or (a.train_size is not None and a.train_size < 1):
        raise common.UserError("--epochs, --n, --diagnose-n and --train-size must be >= 1")
    a.families = fams
    return a


def plan(a):
    """The runs to do, in order (a teacher before its students), each with its argv and paths."""
    run_dir = lambda name: os.path.join(a.out_dir, "runs", name)
    paths = {"trades": os.path.join(run_dir("trades-awp"), "best.pt")}
    paths["teacher"] = a.teacher or paths["trades"]
    wanted = {r[0] for r in RUNS if r[1] in a.families}
    if "distill" in a.families and not a.teacher:
        wanted.add("trades-awp")  # the shared teacher
    runs = []
    for name, family, label, script, flags, passes in RUNS:
        if name not in wanted:
            continue
        own = shlex.split(flags.format(**paths)) + ["--out-dir", run_dir(name)]
        runs.append(dict(name=name, family=family, label=label, script=script, own=own, argv=shared(a) + own,
                         passes=passes, dir=run_dir(name), eval=os.path.join(a.out_dir, "eval", f"{name}.json")))
    return runs


def shared(a):
    """The flags every training gets: same data, arch, budget, seed and device."""
    return (["--dataset", a.dataset, "--data-dir", a.data_dir, "--arch", a.arch, "--epochs", str(a.epochs),
             "--seed", str(a.seed), "--device", a.device] + (["--train-size", str(a.train_size)] if a.train_size
                                                             else []) + shlex.split(a.train_args))


def status(r):
    if os.path.isfile(os.path.join(r["dir"], "best.pt")) and os.path.isfile(os.path.join(r["dir"], "DONE")):
        return "done"
    return "resume" if os.path.isdir(r["dir"]) else "new"


def unit_cost(a, info, amp):
    """Seconds per image of one forward+backward pass of --arch on --device, measured on a small batch."""
    device = torch.device(a.device)
    model = common.model_for(a.arch, info).to(device)
    bs = 64 if device.type == "cuda" else 16
    x, y = torch.rand(bs, info.channels, info.size, info.size, device=device), torch.zeros(bs, dtype=torch.long, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(4):  # the fastest of 3 after a warm-up: robust to a busy machine
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            F.cross_entropy(model(x).float(), y).backward()
        sync()
        times.append(time.perf_counter() - t)
    return min(times[1:]) / bs


def estimate(a, runs):
    """Rough seconds per run (training + evaluation): measured unit cost x counted passes per image."""
    (x, y), info = common.load_dataset(a.dataset, a.data_dir, train=True)
    n_all = len(x) if y is not None else len(x.samples)
    val = min(1000, n_all // 5)
    n_train = a.train_size or n_all - val
    # x2: what a bare forward+backward leaves out (projections, optimizer, loaders, Python, a busy machine)
    train_unit = 2 * unit_cost(a, info, common.native_bf16(a.device))  # the scripts' default precision there
    eval_unit = 2 * unit_cost(a, info, False)  # evaluate.py: float32
    ev = evaluate.get_args(["model.pt"] + shlex.split(a.eval_args))
    # AA-lite: APGD-CE on all, APGD-T (9 targets) on the ~half still robust; diagnostics: ~240 attack steps
    # plus min(1000, queries) Square forwards (a third of a forward+backward each)
    eval_s = eval_unit * (a.n * ev.apgd_iters * (1 + 9 * 0.5) + a.diagnose_n * (240 + min(1000, ev.square_queries) / 3))
    for r in runs:
        stages = 2 if r["script"] == "defensive_distillation" else 1
        per_epoch = n_train * r["passes"] + stages * val * (1 if r["family"] == "dd" else STEPS + 1)
        r["est_train"] = 0.0 if r["status"] == "done" else a.epochs * per_epoch * train_unit
        r["est_eval"] = 0.0 if os.path.isfile(r["eval"]) and r["status"] == "done" else eval_s


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n != 1 else ''})"


def train(r, a):
    """Train one run (or continue it), then mark it finished. Returns the path of best.pt."""
    argv = r["argv"] + (["--resume"] if r["status"] == "resume" else [])
    t = time.time()
    best = importlib.import_module(r["script"]).main(argv)
    with open(os.path.join(r["dir"], "DONE"), "w") as f:
        json.dump({"best": best, "argv": argv, "device": device_name(a.device), "wall_s": time.time() - t}, f)
    if os.path.exists(r["eval"]):
        os.remove(r["eval"])  # evaluated an older checkpoint
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return best


def log_stats(run_dir):
    """(training seconds, images/s) over every stage's log.jsonl (the last line per epoch counts)."""
    secs = images = 0.0
    for root, _, files in os.walk(run_dir):
        if "log.jsonl" in files:
            with open(os.path.join(root, "log.jsonl")) as f:
                epochs = {m["epoch"]: m for m in map(json.loads, f)}
            secs += sum(m["seconds"] for m in epochs.values())
            images += sum(m["seconds"] * m["images_per_s"] for m in epochs.values())
    return secs, images / max(secs, 1e-9)


def evaluate_run(r, a):
    if os.path.isfile(r["eval"]):
        try:
            with open(r["eval"]) as f:
                return json.load(f)
        except ValueError:
            pass  # a half-written report: evaluate again
    os.makedirs(os.path.dirname(r["eval"]), exist_ok=True)
    return evaluate.main([os.path.join(r["dir"], "best.pt"), "--preset", "standard", "--diagnose", "--n", str(a.n),
                          "--diagnose-n", str(a.diagnose_n), "--json", r["eval"], "--device", a.device]
                         + shlex.split(a.eval_args))


def fmt_time(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def write_table(a, rows):
    budget = f"{a.epochs} epochs" + (f", train-size {a.train_size}" if a.train_size else "") + (
        f", `{a.train_args}`" if a.train_args else "")
    proto = next((r["protocol"] for r in rows if r["protocol"]), "AA-lite (apgd-ce, apgd-t)")
    precision = next((r["precision"] for r in rows if r["precision"]), None)
    lines = [f"{a.dataset}, {a.arch}, {budget}, seed {a.seed}; evaluation: {proto}, {a.n} test images "
             f"(diagnostics on {a.diagnose_n})" + (f", precision {precision}" if precision else "") + ".", "",
             "| family | model | clean | after APGD-CE | AA-lite | verdict | train time | images/s | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "" if v is None else f"{100 * v:.2f}%"
    for r in rows:  # the verdict's reasons and the cascade's hints are in results.json and eval/<name>.json
        verdict = str(r["verdict"]).split(":")[0].replace("|", "/")
        lines.append(f"| {r['family']} | {r['label']} | {pct(r['clean'])} | {pct(r.get('after_apgd_ce'))} | "
                     f"{pct(r['aa_lite'])} | {verdict} | {fmt_time(r['train_s'])} | {r['images_per_s']:.0f} | {r['device']} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(a), "rows": rows}, f, indent=1)
    return md


def main(argv=None):
    a = get_args(argv)
    runs = plan(a)
    for r in runs:
        r["status"] = status(r)
    estimate(a, runs)
    print(f"reproduce: {a.dataset}, {a.arch}, {a.epochs} epochs" + (f", train-size {a.train_size}" if a.train_size
          else "") + f", seed {a.seed}, {device_name(a.device)} -> {a.out_dir}")
    print(f"every training: {shlex.join(shared(a))}")
    for i, r in enumerate(runs, 1):
        cmd = f"python {r['script']}.py {shlex.join(r['own'])}"
        print(f"  {i}. {r['name']:<11} {r['status']:<7} ~{fmt_time(r['est_train'] + r['est_eval']):>9}  {cmd}")
    total_t, total_e = sum(r["est_train"] for r in runs), sum(r["est_eval"] for r in runs)
    print(f"rough estimate (one measured forward+backward x passes per image; easily off by 2x): training "
          f"{fmt_time(total_t)}, evaluation {fmt_time(total_e)}, total {fmt_time(total_t + total_e)}", flush=True)
    if a.dry_run:
        return []
    rows, t0 = [], time.time()
    for i, r in enumerate(runs, 1):
        if r["status"] != "done":
            print(f"[{i}/{len(runs)}] train {r['name']} ({r['status']}, {fmt_time(time.time() - t0)} elapsed)", flush=True)
            t = time.time()
            train(r, a)
            print(f"[{i}/{len(runs)}] trained {r['name']} in {fmt_time(time.time() - t)}", flush=True)
        fresh = not os.path.isfile(r["eval"])
        if fresh:
            print(f"[{i}/{len(runs)}] evaluate {r['name']}", flush=True)
        t = time.time()
        report = evaluate_run(r, a)
        if fresh:
            print(f"[{i}/{len(runs)}] evaluated {r['name']} in {fmt_time(time.time() - t)}: clean "
                  f"{100 * report['clean_acc']:.2f}%, AA-lite {100 * report['robust_acc']:.2f}%", flush=True)
        with open(os.path.join(r["dir"], "DONE")) as f:
            done = json.load(f)
        secs, ips = log_stats(r["dir"])
        diag = report.get("diagnostics", {})
        rows.append({"name": r["name"], "family": r["family"], "label": r["label"], "checkpoint": done["best"],
                     "clean": report["clean_acc"], "aa_lite": report["robust_acc"], "verdict": diag.get("verdict"),
                     "masking_suspected": diag.get("masking_suspected"), "train_s": secs, "images_per_s": ips,
                     "device": done["device"], "protocol": report.get("protocol"), "precision": report.get("precision"),
                     "after_apgd_ce": next((x["acc_after"] for x in report["attacks"] if x["name"] == "apgd-ce"), None),
                     "warnings": report.get("warnings", []), "command": r["argv"]})
    md = write_table(a, rows)
    print("\n" + md + f"\nwritten: {os.path.join(a.out_dir, 'results.md')}, {os.path.join(a.out_dir, 'results.json')}")
    return rows


if __name__ == "__main__":
    common.run_main(main)
