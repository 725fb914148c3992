"""Reproduce the results tables: each family's baseline and method, same data, arch, budget and seeds, all
evaluated alike (AA-lite = `evaluate.py --preset standard`, with `--diagnose`), on one fixed set of test images.

    python -m tests.reproduce --dataset mnist --data-dir DIR --train-size 10000 --epochs 4 \\
        --train-args "--milestones 3" --n 1000 --diagnose-n 200 --seeds 0 1 2 --device cpu   # README, MNIST
    python -m tests.reproduce --dataset mnist --data-dir DIR --epochs 10 --families pgdat,trades --n 1000 \\
        --diagnose-n 200 --official-autoattack pgd-at,trades-awp --device cpu      # README, MNIST full budget
    python -m tests.reproduce --preset cpu-cifar10 --dataset folder --data-dir TREE          # README, CIFAR-10 on a CPU
    python -m tests.reproduce --dataset cifar10 --arch resnet18 --epochs 30 \\
        --train-args "--milestones 15 23" --n 1000                                           # a GPU
    python -m tests.reproduce --dataset synthetic --arch wrn-10-1 --epochs 1 ...             # a smoke test (tests/)

Families (--families, comma list; each is a baseline and a method trained by the same script):
  pgdat    PGD-AT  (at_alp.py --alp 0 --at 0 --w-clean 0 --w-adv 1)   and AT+ALP  (at_alp.py)
  trades   TRADES-AWP (ltd.py --no-distill)                           and LTD     (ltd.py --teacher <TRADES-AWP>)
  distill  RSLAD (infoard.py --asa off --mim logit --teacher T)       and InfoARD (infoard.py --w-kl 0.1 --teacher T)
  dd       its T=1 control (--temperature 1)                          and defensive distillation (T=100)
RSLAD and InfoARD share one teacher T: --teacher, or by default the same seed's TRADES-AWP run's best.pt
(trained here even when the trades family is not asked for). Defensive distillation trains Papernot's CNN
(papernot-mnist on MNIST, papernot-cifar elsewhere) with its own flags from --dd-args.

Seeds (--seeds 0 1 2): every run once per seed. The seed changes the init, the data order, the training
subset and the attacks' random starts; the evaluated test images are the same fixed subset for every seed and
model, so comparisons are paired. The aggregate table gives mean and sample standard deviation over seeds and,
per family, the paired difference method - baseline (its mean and a 95% t-interval over seeds) and, pooled
over seeds, the images robust for one and not the other (a two-sided sign test).

Files in --out-dir: runs/<name>-s<seed>/ (the script's own --out-dir; DONE marks a finished training),
eval/<name>-s<seed>.json (evaluate.py's report; -autoattack.json: the official AutoAttack's, with
--official-autoattack), results.md (the tables for the README) and results.json.
Resume: run the same command again. A run with best.pt and DONE is reused as it is; a run started but not
finished continues with --resume; an evaluation whose JSON exists is reused (a retrained run is re-evaluated).

--rows-dir DIR also keeps each finished row (its numbers, per-image outcomes, verdict, time and command; a few
KB, no weights) as DIR/<name>-s<seed>.json, and a row found there is reused without its checkpoint. That spreads
a multi-seed run over machines or sessions whose files do not last: run one seed at a time, keep DIR (commit
it), and the last call with every seed writes the aggregate table. A teacher whose row is kept but whose
checkpoint is gone is trained again only if a student of its seed still needs it; each row keeps the SHA-256
of its weights, and a retraining with the same weights (training on a CPU is deterministic for a given torch,
seed and thread count) keeps the row without evaluating again; other weights are evaluated and replace it.
Rows made with other settings are refused, not overwritten.
"""
import argparse
import gc
import hashlib
import importlib
import json
import math
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
# Named budgets: every value here is what the flag of the same name would set; a flag you pass wins.
# cpu-cifar10: about 15 minutes of PGD-AT on 2 CPU cores. Its arch was chosen by measurement (README, Reproduce):
# at that budget wrn-16-1 (10,000 images x 4 epochs) was at least as robust as wrn-16-2 (5,000 x 4) and wrn-10-2.
PRESETS = {
    "cpu-cifar10": dict(dataset="cifar10", arch="wrn-16-1", train_size=10000, epochs=4,
                        train_args="--milestones 3 --val-size 500", dd_args="--epochs 10", n=1000, diagnose_n=200,
                        device="cpu"),
}
DEFAULTS = dict(dataset="cifar10", arch=None, train_size=None, epochs=30, train_args="", dd_args="", n=1000,
                diagnose_n=500, device=None)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unset flags take the --preset's value, else the default shown.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named budget: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--dataset", help=f"one of {', '.join(common.DATASETS)} (default: cifar10)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--arch", help="every adversarial run's arch (default: papernot-mnist on MNIST, else resnet18)")
    p.add_argument("--epochs", type=int, help="epochs of every training (default: 30)")
    p.add_argument("--train-size", type=int, help="passed on to every script when given")
    p.add_argument("--families", default=None, help=f"comma list from {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--teacher", default=None, help="RSLAD/InfoARD teacher (default: each seed's TRADES-AWP best.pt)")
    p.add_argument("--out-dir", default=None, help="default: reproduce-<dataset>-<arch>")
    p.add_argument("--n", type=int, help="test images for AA-lite, one fixed random subset (default: 1000)")
    p.add_argument("--diagnose-n", type=int, help="test images for the masking diagnostics (default: 500)")
    p.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of everything per seed (default: 0)")
    p.add_argument("--train-args", help="extra flags for every training script, e.g. \"--batch-size 256\"")
    p.add_argument("--dd-args", help="extra flags for the two defensive-distillation runs, e.g. \"--epochs 10\"")
    p.add_argument("--eval-args", default="", help="extra flags for evaluate.py, e.g. \"--apgd-iters 20\"")
    p.add_argument("--official-autoattack", default=None, metavar="RUNS",
                   help="comma list of runs (pgd-at,trades-awp,...) or 'all': also attack them with the official "
                        "AutoAttack (version standard) on the same images, a column beside AA-lite (needs the "
                        "package: pip install pyautoattack; never a requirement)")
    p.add_argument("--rows-dir", default=None, help="keep every finished row here too, and reuse rows found here "
                   "without their checkpoints (see above)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    a = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise common.UserError("run tests.reproduce without torchrun (it calls the scripts one after another)")
    for k, v in {**DEFAULTS, **PRESETS.get(a.preset, {})}.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.arch = a.arch or ("papernot-mnist" if a.dataset == "mnist" else "resnet18")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.out_dir = a.out_dir or f"reproduce-{a.preset or a.dataset + '-' + a.arch}"
    fams = a.families.split(",") if a.families else list(FAMILIES)
    if bad := [f for f in fams if f not in FAMILIES]:
        raise common.UserError(f"unknown famil{'ies' if len(bad) > 1 else 'y'} {bad}; choose from {', '.join(FAMILIES)}")
    if a.teacher and not os.path.isfile(a.teacher):
        raise common.UserError(f"--teacher {a.teacher}: no such file")
    if min(a.epochs, a.n, a.diagnose_n) < 1 or (a.train_size is not None and a.train_size < 1):
        raise common.UserError("--epochs, --n, --diagnose-n and --train-size must be >= 1")
    names = [r[0] for r in RUNS]
    if a.official_autoattack and (bad := set(a.official_autoattack.split(",")) - {"all", *names}):
        raise common.UserError(f"--official-autoattack: unknown run(s) {sorted(bad)}; choose from all, {', '.join(names)}")
    if a.official_autoattack and evaluate.official_autoattack() is None and not a.dry_run:
        raise common.UserError("--official-autoattack needs the official package: pip install pyautoattack "
                               "(or fra31/auto-attack)")
    if len(set(a.seeds)) != len(a.seeds):
        raise common.UserError(f"--seeds repeats a seed: {a.seeds}")
    a.families = fams
    return a


def plan(a):
    """The runs to do, seed by seed, in order (a teacher before its students), each with its argv and paths."""
    wanted = {r[0] for r in RUNS if r[1] in a.families}
    if "distill" in a.families and not a.teacher:
        wanted.add("trades-awp")  # the shared teacher
    dd_arch = "papernot-mnist" if a.dataset == "mnist" else "papernot-cifar"
    runs = []
    for seed in a.seeds:
        run_dir = lambda name: os.path.join(a.out_dir, "runs", f"{name}-s{seed}")
        paths = {"trades": os.path.join(run_dir("trades-awp"), "best.pt")}
        paths["teacher"] = a.teacher or paths["trades"]
        for name, family, label, script, flags, passes in RUNS:
            if name not in wanted:
                continue
            own = shlex.split(flags.format(**paths))
            if family == "dd":
                own = ["--arch", dd_arch] + own + shlex.split(a.dd_args)
            own += ["--out-dir", run_dir(name)]
            runs.append(dict(name=name, seed=seed, family=family, label=label, script=script, own=own,
                             argv=shared(a, seed) + own, passes=passes, dir=run_dir(name),
                             eval=os.path.join(a.out_dir, "eval", f"{name}-s{seed}.json"),
                             eval_aa=os.path.join(a.out_dir, "eval", f"{name}-s{seed}-autoattack.json"),
                             row_file=a.rows_dir and os.path.join(a.rows_dir, f"{name}-s{seed}.json")))
    return runs


def shared(a, seed):
    """The flags every training gets: same data, arch, budget and device; the seed of its row."""
    return (["--dataset", a.dataset, "--data-dir", a.data_dir, "--arch", a.arch, "--epochs", str(a.epochs),
             "--seed", str(seed), "--device", a.device] + (["--train-size", str(a.train_size)] if a.train_size
                                                             else []) + shlex.split(a.train_args))


def row_key(a, r):
    """The settings a kept row must have been made with to be reused (paths and the device are not among them)."""
    return {"name": r["name"], "seed": r["seed"], "dataset": a.dataset, "arch": a.arch, "epochs": a.epochs,
            "train_size": a.train_size, "train_args": a.train_args, "dd_args": a.dd_args, "n": a.n,
            "diagnose_n": a.diagnose_n, "eval_args": a.eval_args, "teacher": a.teacher,
            "official_autoattack": "standard" if official_wanted(a, r) else None}


def official_wanted(a, r):
    """Whether --official-autoattack asks for run r."""
    return bool(a.official_autoattack) and bool({"all", r["name"]} & set(a.official_autoattack.split(",")))


def weights_sha256(path):
    """SHA-256 of a checkpoint's weights (names, dtypes, shapes and values; not its metadata such as paths)."""
    h = hashlib.sha256()
    for name, t in torch.load(path, map_location="cpu", weights_only=True)["model"].items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def kept_row(a, r):
    """The row kept in --rows-dir for run r, or None. Refuses a row made with other settings."""
    path = r.get("row_file")
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            kept = json.load(f)
    except ValueError:
        raise common.UserError(f"{path}: not a JSON row (a damaged file?); remove it to run that row again")
    if kept.get("key") != row_key(a, r):
        diff = {k: (kept.get("key", {}).get(k), v) for k, v in row_key(a, r).items() if kept.get("key", {}).get(k) != v}
        raise common.UserError(f"{path} was made with other settings (kept, now): {diff}; "
                               f"choose another --rows-dir or remove that file")
    return kept["row"]


def status(r):
    if os.path.isfile(os.path.join(r["dir"], "best.pt")) and os.path.isfile(os.path.join(r["dir"], "DONE")):
        return "done"
    return "resume" if os.path.isdir(r["dir"]) else "new"


# Real seconds per training pass / unit_cost. CPU: measured with PGD-AT on 2 cores (0.65 for wrn-16-1 on the
# CIFAR-10 JPEG copy, 0.68 for papernot-mnist on MNIST: bigger batches and input-only gradients are cheaper per
# image than the 16-image probe). CUDA: not measured; 2 allows for what the probe leaves out (projections, loaders).
OVERHEAD = {"cpu": 0.7, "cuda": 2.0}
# The official AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) over AA-lite's time on the same images: 4.4x
# measured on a robust MNIST model (39.4 vs 9.0 min; FAB-T and Square run on every image the APGDs leave robust).
OFFICIAL_AA_COST = 4.4


def unit_cost(arch, a, info, amp):
    """Seconds per image of one forward+backward pass of `arch` on --device, measured on a small batch: the fastest
    of 3 after two warm-up passes (on a CPU the first passes build their kernels and take 10-20x longer)."""
    device = torch.device(a.device)
    model = common.model_for(arch, info).to(device)
    bs = 64 if device.type == "cuda" else 16
    x, y = torch.rand(bs, info.channels, info.size, info.size, device=device), torch.zeros(bs, dtype=torch.long, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(5):  # the fastest of 3 after the warm-up: robust to a busy machine
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            F.cross_entropy(model(x).float(), y).backward()
        sync()
        times.append(time.perf_counter() - t)
    return min(times[2:]) / bs


def estimate(a, runs):
    """Rough seconds per run (training + evaluation): measured unit cost x counted passes per image."""
    (x, y), info = common.load_dataset(a.dataset, a.data_dir, train=True)
    n_all = len(x) if y is not None else len(x.samples)
    val = min(1000, n_all // 5)
    n_train = a.train_size or n_all - val
    amp = common.native_bf16(a.device)  # the scripts' default precision there
    ev = evaluate.get_args(["model.pt"] + shlex.split(a.eval_args))
    costs = {}
    for r in runs:
        arch, epochs = last_flag(r["argv"], "--arch"), int(last_flag(r["argv"], "--epochs"))
        if arch not in costs:  # x OVERHEAD: from a bare forward+backward on 16 images to a real pass
            k = OVERHEAD.get(torch.device(a.device).type, 2.0)
            costs[arch] = k * unit_cost(arch, a, info, amp), k * unit_cost(arch, a, info, False)  # evaluation: fp32
        train_unit, eval_unit = costs[arch]
        # AA-lite: APGD-CE on all, APGD-T (9 targets) on the ~half still robust; diagnostics: ~240 attack steps
        # plus min(1000, queries) Square forwards (a third of a forward+backward each)
        eval_s = eval_unit * (a.n * ev.apgd_iters * (1 + 9 * 0.5) + a.diagnose_n * (240 + min(1000, ev.square_queries) / 3))
        stages = 2 if r["script"] == "defensive_distillation" else 1
        per_epoch = n_train * r["passes"] + stages * val * (1 if r["family"] == "dd" else STEPS + 1)
        r["est_train"] = 0.0 if r["status"] in ("done", "kept") else epochs * per_epoch * train_unit
        r["est_eval"] = 0.0 if r["status"] == "kept" or os.path.isfile(r["eval"]) and r["status"] == "done" else eval_s
        if official_wanted(a, r) and r["status"] != "kept" and not (r["status"] == "done" and os.path.isfile(r["eval_aa"])):
            r["est_eval"] += OFFICIAL_AA_COST * eval_s


def last_flag(argv, flag):
    """The value of the last `flag` in argv (argparse lets the last one win)."""
    return argv[len(argv) - argv[::-1].index(flag)]


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
    for path in (r["eval"], r["eval_aa"]):
        if os.path.exists(path):
            os.remove(path)  # evaluated an older checkpoint
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


def evaluate_run(r, a, official=False):
    """evaluate.py's report on run r: AA-lite with the diagnostics, or (official=True) the official AutoAttack on
    the same images. A finished report on disk is reused."""
    path, wanted = (r["eval_aa"], "per_image") if official else (r["eval"], "diagnostics")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                report = json.load(f)
            if "per_image" in report and wanted in report:
                return report
        except ValueError:
            pass  # a half-written report: evaluate again
    os.makedirs(os.path.dirname(path), exist_ok=True)
    how = ["--attacks", "autoattack"] if official else ["--preset", "standard", "--diagnose", "--diagnose-n",
                                                        str(a.diagnose_n)] + shlex.split(a.eval_args)
    return evaluate.main([os.path.join(r["dir"], "best.pt"), "--n", str(a.n), "--json", path, "--device", a.device,
                          "--seed", str(r["seed"])] + how)


# ---- statistics over seeds (no SciPy): t-interval of the mean, exact sign test ----

def t_quantile(df):
    """The 97.5% quantile of Student's t with df degrees of freedom (exact table to 30, then a series in 1/df)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
    if df <= len(table):
        return table[df - 1]
    z = 1.959964  # Cornish-Fisher expansion of t around the normal quantile
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_sd_interval(values):
    """(mean, sample sd, (low, high) 95% t-interval of the mean); sd and interval are None for one value."""
    k, m = len(values), sum(values) / len(values)
    if k < 2:
        return m, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (k - 1))
    half = t_quantile(k - 1) * sd / math.sqrt(k)
    return m, sd, (m - half, m + half)


def sign_test(wins, losses):
    """Two-sided exact sign test: P of a split at least this uneven among wins + losses fair coin flips."""
    return min(1.0, 2 * evaluate.binom_tail(max(wins, losses), wins + losses, 0.5)) if wins + losses else 1.0


def fmt_time(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def aggregate(rows):
    """Per model: mean and sd over seeds; per family: the paired difference method - baseline (AA-lite, points)
    per seed with its t-interval, and the pooled per-image sign test. Returns (models, families)."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    models = []
    for label in labels:
        rs = [r for r in rows if r["label"] == label]
        c, cs, _ = mean_sd_interval([100 * r["clean"] for r in rs])
        aa, aas, _ = mean_sd_interval([100 * r["aa_lite"] for r in rs])
        models.append(dict(label=label, family=rs[0]["family"], seeds=[r["seed"] for r in rs], clean_mean=c,
                           clean_sd=cs, aa_mean=aa, aa_sd=aas,
                           masked=sum(bool(r["masking_suspected"]) for r in rs),
                           unjudged=sum(r["masking_suspected"] is None for r in rs)))
    families = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        base_label, method_label = [m for m in (x[2] for x in RUNS if x[1] == fam)]
        base = {r["seed"]: r for r in rows if r["label"] == base_label}
        method = {r["seed"]: r for r in rows if r["label"] == method_label}
        seeds = [s for s in base if s in method]
        if not seeds:
            continue
        diffs = [100 * (method[s]["aa_lite"] - base[s]["aa_lite"]) for s in seeds]
        mean, sd, ci = mean_sd_interval(diffs)
        wins = losses = 0
        for s in seeds:
            rb, rm = base[s]["per_image"], method[s]["per_image"]
            assert rb["index"] == rm["index"], "the evaluated test images differ between runs"
            wins += sum(m == "1" and b == "0" for m, b in zip(rm["robust"], rb["robust"]))
            losses += sum(m == "0" and b == "1" for m, b in zip(rm["robust"], rb["robust"]))
        families.append(dict(family=fam, baseline=base_label, method=method_label, seeds=seeds, diffs=diffs,
                             mean=mean, sd=sd, ci=ci, method_only=wins, baseline_only=losses,
                             sign_p=sign_test(wins, losses)))
    return models, families


def verdict_words(f):
    """One sentence on whether the method's AA-lite differs from its baseline's at this budget."""
    k = len(f["seeds"])
    head = f"{f['method']} - {f['baseline']}: {f['mean']:+.1f} points of AA-lite"
    if f["ci"] is None:
        head += f" on 1 seed (no interval over seeds: run more seeds to compare)"
    else:
        lo, hi = f["ci"]
        head += f", 95% t-interval [{lo:+.1f}, {hi:+.1f}] over {k} seeds: "
        head += (f"{f['method']} beats {f['baseline']} at this budget" if lo > 0 else
                 f"{f['baseline']} beats {f['method']} at this budget" if hi < 0 else
                 "not distinguishable from zero at this budget")
    ratio = (f"per image, pooled over seeds, {f['method_only']} images are robust only for {f['method']} and "
             f"{f['baseline_only']} only for {f['baseline']} (sign test p = {f['sign_p']:.2g}"
             + ("; beyond the test-image noise of these trained models)" if f["sign_p"] < 0.05 else ")"))
    return head + "; " + ratio + "."


def write_table(a, rows):
    budget = f"{a.epochs} epochs" + (f", train-size {a.train_size}" if a.train_size else "") + (
        f", `{a.train_args}`" if a.train_args else "")
    proto = next((r["protocol"] for r in rows if r["protocol"]), "AA-lite (apgd-ce, apgd-t)")
    precision = next((r["precision"] for r in rows if r["precision"]), None)
    seeds = ", ".join(map(str, a.seeds))
    lines = [f"{a.dataset}, {a.arch}, {budget}, seed{'s' if len(a.seeds) > 1 else ''} {seeds}; evaluation: {proto}, "
             f"the same {a.n} test images for every run (diagnostics on {a.diagnose_n})"
             + (f", precision {precision}" if precision else "") + ".", "",
             "| family | model | seed | clean | after APGD-CE | AA-lite | verdict | train time | images/s | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    official = any(r.get("autoattack_per_image") for r in rows)
    if official:  # the official AutoAttack's column, beside AA-lite
        lines[-2] = lines[-2].replace("| AA-lite |", "| AA-lite | AutoAttack (official, standard) |")
        lines[-1] += "---|"
    for r in rows:  # the verdict's reasons and the cascade's hints are in results.json and eval/<name>-s<seed>.json
        n, pi = r["n"], r["per_image"]
        verdict = str(r["verdict"]).split(":")[0].replace("|", "/")
        aa = r.get("autoattack_per_image")
        lines.append(f"| {r['family']} | {r['label']} | {r['seed']} | {evaluate.format_accuracy(pi['clean'].count('1'), n)} | "
                     f"{100 * r['after_apgd_ce']:.1f}% | {evaluate.format_accuracy(pi['robust'].count('1'), n)} | "
                     + (f"{evaluate.format_accuracy(aa.count('1'), n) if aa else 'not run'} | " if official else "")
                     + f"{verdict} | {fmt_time(r['train_s'])} | {r['images_per_s']:.0f} | {r['device']} |")
    models, families = aggregate(rows)
    sd = lambda v: "" if v is None else f" ± {v:.1f}"
    lines += ["", f"Over seeds ({seeds}): mean ± sample standard deviation, in %.", "",
              "| family | model | seeds | clean | AA-lite | runs flagged for masking |", "|---|---|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m['family']} | {m['label']} | {len(m['seeds'])} | {m['clean_mean']:.1f}{sd(m['clean_sd'])} | "
                     f"{m['aa_mean']:.1f}{sd(m['aa_sd'])} | {m['masked']}/{len(m['seeds'])}"
                     + (f" ({m['unjudged']} not judged: not learned)" if m["unjudged"] else "") + " |")
    lines += ["", "Paired differences, method - baseline (AA-lite, points; per seed, then mean and 95% t-interval "
                  "over seeds; per image pooled over seeds, with a two-sided sign test):", "",
              "| family | difference | per seed | mean | 95% t-interval | robust only for method / only for baseline | sign test p |",
              "|---|---|---|---|---|---|---|"]
    for f in families:
        ci = "" if f["ci"] is None else f"[{f['ci'][0]:+.1f}, {f['ci'][1]:+.1f}]"
        lines.append(f"| {f['family']} | {f['method']} - {f['baseline']} | {', '.join(f'{d:+.1f}' for d in f['diffs'])} | "
                     f"{f['mean']:+.1f} | {ci} | {f['method_only']} / {f['baseline_only']} | {f['sign_p']:.2g} |")
    lines += [""] + [f"- {verdict_words(f)}" for f in families]
    md = "\n".join(lines) + "\n"
    os.makedirs(a.out_dir, exist_ok=True)
    tmp = os.path.join(a.out_dir, f"results.md.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(a.out_dir, "results.md"))
    evaluate.write_report(os.path.join(a.out_dir, "results.json"),
                          {"settings": vars(a), "rows": rows, "models": models, "families": families})
    return md


def main(argv=None):
    a = get_args(argv)
    runs = plan(a)
    for r in runs:
        r["status"] = status(r)
        r["kept"] = kept_row(a, r)
    for r in runs:  # a kept row is reused, unless its checkpoint is gone and a student still to run needs it
        best = os.path.join(r["dir"], "best.pt")
        needed = any(s["kept"] is None and s["status"] != "done" and best in s["argv"] for s in runs if s is not r)
        if r["kept"] is not None and not (needed and r["status"] != "done"):
            r["status"] = "kept"
    estimate(a, runs)
    print(f"reproduce: {a.dataset}, {a.arch}, {a.epochs} epochs" + (f", train-size {a.train_size}" if a.train_size
          else "") + f", seeds {' '.join(map(str, a.seeds))}, {device_name(a.device)} -> {a.out_dir}")
    print(f"every training: {shlex.join(shared(a, a.seeds[0]))}  (--seed per row)")
    for i, r in enumerate(runs, 1):
        cmd = f"python {r['script']}.py {shlex.join(r['own'])}"
        print(f"  {i}. {r['name']:<11} s{r['seed']} {r['status']:<7} ~{fmt_time(r['est_train'] + r['est_eval']):>9}  {cmd}")
    total_t, total_e = sum(r["est_train"] for r in runs), sum(r["est_eval"] for r in runs)
    print(f"rough estimate (one measured forward+backward x passes per image; easily off by 2x): training "
          f"{fmt_time(total_t)}, evaluation {fmt_time(total_e)}, total {fmt_time(total_t + total_e)}", flush=True)
    if a.dry_run:
        return []
    rows, t0 = [], time.time()
    for i, r in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {r['name']} seed {r['seed']}"
        if r["status"] == "kept":
            rows.append(r["kept"])
            continue
        if r["status"] != "done":
            print(f"{tag}: train ({r['status']}, {fmt_time(time.time() - t0)} elapsed)", flush=True)
            t = time.time()
            train(r, a)
            print(f"{tag}: trained in {fmt_time(time.time() - t)}", flush=True)
            if r["kept"] is not None:  # a kept teacher trained again for its students
                same = r["kept"].get("weights_sha256") == weights_sha256(os.path.join(r["dir"], "best.pt"))
                print(f"{tag}: " + ("the same weights as its kept row, which stands" if same else
                                    "other weights than its kept row: evaluated again, the row replaced"), flush=True)
                if same:
                    rows.append(r["kept"])
                    continue
        fresh = not os.path.isfile(r["eval"])
        if fresh:
            print(f"{tag}: evaluate", flush=True)
        t = time.time()
        report = evaluate_run(r, a)
        if fresh:
            print(f"{tag}: evaluated in {fmt_time(time.time() - t)}: clean {100 * report['clean_acc']:.2f}%, "
                  f"AA-lite {100 * report['robust_acc']:.2f}%", flush=True)
        aa = None
        if official_wanted(a, r):
            fresh = not os.path.isfile(r["eval_aa"])
            t = time.time()
            aa = evaluate_run(r, a, official=True)
            if fresh:
                print(f"{tag}: official AutoAttack in {fmt_time(time.time() - t)}: {100 * aa['robust_acc']:.2f}%", flush=True)
            assert aa["per_image"]["index"] == report["per_image"]["index"], "AutoAttack saw other test images"
        with open(os.path.join(r["dir"], "DONE")) as f:
            done = json.load(f)
        secs, ips = log_stats(r["dir"])
        diag = report.get("diagnostics", {})
        rows.append({"name": r["name"], "seed": r["seed"], "family": r["family"], "label": r["label"],
                     "checkpoint": done["best"], "weights_sha256": weights_sha256(done["best"]), "n": report["n"], "clean": report["clean_acc"],
                     "aa_lite": report["robust_acc"], "per_image": report["per_image"], "verdict": diag.get("verdict"),
                     "masking_suspected": diag.get("masking_suspected"), "train_s": secs, "images_per_s": ips,
                     "device": done["device"], "protocol": report.get("protocol"), "precision": report.get("precision"),
                     "after_apgd_ce": next((x["acc_after"] for x in report["attacks"] if x["name"] == "apgd-ce"), None),
                     "warnings": report.get("warnings", []), "command": r["argv"],
                     "autoattack": aa and aa["robust_acc"], "autoattack_per_image": aa and aa["per_image"]["robust"]})
        if r["row_file"]:
            os.makedirs(a.rows_dir, exist_ok=True)
            evaluate.write_report(r["row_file"], {"key": row_key(a, r), "row": rows[-1]})
    md = write_table(a, rows)
    print("\n" + md + f"\nwritten: {os.path.join(a.out_dir, 'results.md')}, {os.path.join(a.out_dir, 'results.json')}")
    return rows


if __name__ == "__main__":
    common.run_main(main)
