"""tests.reproduce end to end on synthetic data with tiny budgets and two seeds: one table row per run and seed
with a verdict, an aggregate table whose means, differences and intervals match numbers computed here, and a
second call that reuses every finished checkpoint and evaluation instead of training again. Also the
statistics helpers against hand-computed values."""
import functools
import json
import math
import os
import types

import pytest
import torch

import at_alp
import common
import defensive_distillation
import evaluate
import infoard
import ltd
from tests import reproduce

SCRIPTS = (at_alp, ltd, infoard, defensive_distillation)
NAMES = ["pgd-at", "at-alp", "trades-awp", "ltd", "rslad", "infoard", "dd-t1", "dd"]


def argv(out):
    return ["--dataset", "synthetic", "--arch", "wrn-10-1", "--epochs", "1", "--n", "8", "--diagnose-n", "4",
            "--device", "cpu", "--out-dir", str(out), "--seeds", "0", "1", "--train-args", "--steps 1 --batch-size 32 --val-size 16",
            "--eval-args", "--apgd-iters 2 --square-queries 4 --batch-size 8"]


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    mp = pytest.MonkeyPatch()  # 64 training images - 16 held out = 1 step of 32 per epoch
    mp.setattr(common, "synthetic_data", functools.partial(common.synthetic_data, n_train=64, n_test=32))
    out = tmp_path_factory.mktemp("reproduce")
    rows = reproduce.main(argv(out))
    yield out, rows, mp
    mp.undo()


def test_table_has_one_row_per_run_and_seed_with_a_verdict(first_call):
    out, rows, _ = first_call
    assert [(r["name"], r["seed"]) for r in rows] == [(n, s) for s in (0, 1) for n in NAMES]
    assert [r["family"] for r in rows[:8]] == ["pgdat"] * 2 + ["trades"] * 2 + ["distill"] * 2 + ["dd"] * 2
    for r in rows:
        report = json.loads((out / "eval" / f"{r['name']}-s{r['seed']}.json").read_text())
        assert (r["clean"], r["aa_lite"]) == (report["clean_acc"], report["robust_acc"])
        assert r["per_image"]["robust"].count("1") == round(r["aa_lite"] * r["n"]) and len(r["per_image"]["robust"]) == 8
        assert r["verdict"] == report["diagnostics"]["verdict"] and r["verdict"]
        assert r["train_s"] > 0 and r["images_per_s"] > 0 and r["device"].startswith("CPU")
    # paired: every run was attacked on the same test images; the seed changed the training
    assert len({tuple(r["per_image"]["index"]) for r in rows}) == 1
    for name in NAMES:
        s0, s1 = (torch.load(out / "runs" / f"{name}-s{s}" / "best.pt", weights_only=True) for s in (0, 1))
        assert any(not torch.equal(s0["model"][k], s1["model"][k]) for k in s0["model"] if "weight" in k)
    md = (out / "results.md").read_text()
    table = [line for line in md.split("\n\n")[1].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        k = r["per_image"]["robust"].count("1")
        assert f"| {r['label']} | {r['seed']} |" in line and f"{100 * k / 8:.1f}% [" in line and f"], {k}/8 |" in line
        assert ("masking suspected" in line) == bool(r["masking_suspected"])
        assert str(r["verdict"]).split(":")[0] in line  # the verdict's headline (masking, or "has not learned")
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    # the families share what they must: LTD, RSLAD and InfoARD distil from the same seed's TRADES-AWP best.pt
    for r in rows:
        if r["name"] in ("ltd", "rslad", "infoard"):
            teacher = str(out / "runs" / f"trades-awp-s{r['seed']}" / "best.pt")
            assert r["command"][r["command"].index("--teacher") + 1] == teacher


def test_aggregate_table_matches_numbers_computed_here(first_call):
    out, rows, _ = first_call
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    by = {(r["label"], r["seed"]): r for r in rows}
    for m in res["models"]:
        v = [100 * by[(m["label"], s)]["aa_lite"] for s in (0, 1)]
        assert m["aa_mean"] == pytest.approx((v[0] + v[1]) / 2) and m["aa_sd"] == pytest.approx(abs(v[0] - v[1]) / math.sqrt(2))
        assert f"| {m['label']} | 2 | " in md
    assert [f["family"] for f in res["families"]] == ["pgdat", "trades", "distill", "dd"]
    for f in res["families"]:
        d = [100 * (by[(f["method"], s)]["aa_lite"] - by[(f["baseline"], s)]["aa_lite"]) for s in (0, 1)]
        assert f["diffs"] == pytest.approx(d) and f["mean"] == pytest.approx(sum(d) / 2)
        half = 12.706 * (abs(d[0] - d[1]) / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1 df) x sd / sqrt(2)
        assert f["ci"] == pytest.approx([f["mean"] - half, f["mean"] + half])
        only_m = sum(m == "1" and b == "0" for s in (0, 1) for m, b in zip(by[(f["method"], s)]["per_image"]["robust"],
                                                                          by[(f["baseline"], s)]["per_image"]["robust"]))
        only_b = sum(m == "0" and b == "1" for s in (0, 1) for m, b in zip(by[(f["method"], s)]["per_image"]["robust"],
                                                                          by[(f["baseline"], s)]["per_image"]["robust"]))
        assert (f["method_only"], f["baseline_only"]) == (only_m, only_b)
        assert f"{f['method']} - {f['baseline']}: {f['mean']:+.1f} points" in md


def test_statistics_helpers_against_hand_computed_values():
    assert reproduce.sign_test(0, 5) == pytest.approx(2 / 32)
    assert reproduce.sign_test(1, 9) == pytest.approx(2 * 11 / 1024) and reproduce.sign_test(9, 1) == reproduce.sign_test(1, 9)
    assert reproduce.sign_test(3, 3) == 1.0 and reproduce.sign_test(0, 0) == 1.0
    m, sd, (lo, hi) = reproduce.mean_sd_interval([1.0, 2.0, 3.0])
    assert (m, sd) == (2.0, 1.0) and (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert reproduce.mean_sd_interval([5.0]) == (5.0, None, None)
    assert reproduce.t_quantile(2) == 4.303 and reproduce.t_quantile(40) == pytest.approx(2.0211, abs=2e-4)
    assert reproduce.t_quantile(120) == pytest.approx(1.9799, abs=2e-4)


def test_second_call_reuses_finished_runs_and_resumes_an_unfinished_one(first_call, monkeypatch):
    out, rows, _ = first_call
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.parent.name != out.name)
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def forbidden(*_, **__):
        raise AssertionError("a finished run was trained or evaluated again")
    for module in SCRIPTS:
        monkeypatch.setattr(module, "main", forbidden)
    monkeypatch.setattr(evaluate, "main", forbidden)
    again = reproduce.main(argv(out))
    assert again == rows
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # no checkpoint, log or report rewritten

    # An interrupted training (no DONE marker) continues with --resume and is evaluated again.
    os.remove(out / "runs" / "at-alp-s1" / "DONE")
    calls = []

    def fake_train(args):
        calls.append(args)
        return str(out / "runs" / "at-alp-s1" / "best.pt")
    monkeypatch.setattr(at_alp, "main", fake_train)
    monkeypatch.setattr(evaluate, "main", lambda args: calls.append(args) or json.loads(
        (out / "eval" / "pgd-at-s1.json").read_text()))
    reproduce.main(argv(out))
    assert len(calls) == 2 and "--resume" in calls[0] and calls[0][calls[0].index("--out-dir") + 1].endswith("at-alp-s1")
    assert calls[0][calls[0].index("--seed") + 1] == "1"
    assert calls[1][0].endswith(os.path.join("at-alp-s1", "best.pt"))  # the retrained run is re-evaluated
    assert calls[1][calls[1].index("--seed") + 1] == "1"


def test_bad_flags_are_one_line_errors_and_the_preset_fills_only_unset_flags():
    with pytest.raises(common.UserError, match="unknown family"):
        reproduce.get_args(["--families", "pgdat,fast"])
    with pytest.raises(common.UserError, match="repeats a seed"):
        reproduce.get_args(["--seeds", "0", "0"])
    a = reproduce.get_args(["--preset", "cpu-cifar10", "--epochs", "2", "--dataset", "folder"])
    preset = reproduce.PRESETS["cpu-cifar10"]
    assert (a.epochs, a.dataset, a.arch, a.train_size, a.n) == (2, "folder", preset["arch"], preset["train_size"], 1000)
    assert "dd" in a.families  # defensive distillation on CIFAR-10 too, with Papernot's CIFAR CNN
    runs = reproduce.plan(a)
    dd = next(r for r in runs if r["name"] == "dd")
    assert reproduce.last_flag(dd["argv"], "--arch") == "papernot-cifar"
    assert reproduce.last_flag(next(r for r in runs if r["name"] == "pgd-at")["argv"], "--arch") == preset["arch"]


def test_rows_dir_carries_finished_rows_to_a_machine_without_the_checkpoints(first_call, tmp_path, monkeypatch):
    out, rows, _ = first_call
    kept = tmp_path / "rows"
    assert reproduce.main(argv(out) + ["--rows-dir", str(kept)]) == rows  # finished runs: their rows are kept
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{n}-s{s}.json" for n in NAMES for s in (0, 1))

    def forbidden(*_, **__):
        raise AssertionError("a kept row was trained or evaluated again")
    with monkeypatch.context() as m:
        for module in SCRIPTS:
            m.setattr(module, "main", forbidden)
        m.setattr(evaluate, "main", forbidden)
        fresh = tmp_path / "elsewhere"  # no checkpoints, no reports: only the kept rows
        assert reproduce.main(argv(fresh) + ["--rows-dir", str(kept)]) == rows
        assert not (fresh / "runs").exists()
        assert (fresh / "results.md").read_text() == (out / "results.md").read_text()

    # LTD's row of seed 1 is missing: its teacher (kept, but its checkpoint is not here) is trained again first.
    # Training is deterministic here, so the teacher's weights match its kept row's hash: that row stands and
    # only LTD is evaluated.
    assert all(len(r["weights_sha256"]) == 64 for r in rows)
    os.remove(kept / "ltd-s1.json")
    trained, evaluated = [], []
    for module in (at_alp, ltd, infoard, defensive_distillation):
        m_main = module.main
        monkeypatch.setattr(module, "main", lambda args, f=m_main: trained.append(args[args.index("--out-dir") + 1]) or f(args))
    e_main = evaluate.main
    monkeypatch.setattr(evaluate, "main", lambda args: evaluated.append(os.path.basename(os.path.dirname(args[0]))) or e_main(args))
    teacher_row = (kept / "trades-awp-s1.json").read_text()
    again = reproduce.main(argv(tmp_path / "third") + ["--rows-dir", str(kept)])
    assert [os.path.basename(d) for d in trained] == ["trades-awp-s1", "ltd-s1"] and evaluated == ["ltd-s1"]
    assert (kept / "ltd-s1.json").is_file() and [(r["name"], r["seed"]) for r in again] == [(r["name"], r["seed"]) for r in rows]
    assert (kept / "trades-awp-s1.json").read_text() == teacher_row and again[10] == rows[10]

    # A retrained teacher whose weights differ from its kept row's is evaluated again and replaces the row.
    row = json.loads(teacher_row)
    row["row"]["weights_sha256"] = "0" * 64
    (kept / "trades-awp-s1.json").write_text(json.dumps(row))
    os.remove(kept / "ltd-s1.json")
    trained.clear(), evaluated.clear()
    reproduce.main(argv(tmp_path / "fifth") + ["--rows-dir", str(kept)])
    assert evaluated == ["trades-awp-s1", "ltd-s1"]
    assert json.loads((kept / "trades-awp-s1.json").read_text())["row"]["weights_sha256"] == rows[10]["weights_sha256"]

    # rows made with other settings are refused, not overwritten
    before = (kept / "pgd-at-s0.json").read_text()
    with pytest.raises(common.UserError, match="other settings"):
        reproduce.main(argv(tmp_path / "fourth") + ["--rows-dir", str(kept), "--n", "7"])
    assert (kept / "pgd-at-s0.json").read_text() == before


def test_official_autoattack_column_on_the_same_images(first_call, monkeypatch):
    out, rows, _ = first_call

    class NoAttack:  # stands in for the official package: returns the images unchanged, so robust = clean
        def __init__(self, model, **kwargs):
            self.apgd_targeted, self.fab = types.SimpleNamespace(), types.SimpleNamespace()

        def run_standard_evaluation(self, x, y, bs=None):
            return x
    monkeypatch.setattr(evaluate, "official_autoattack", lambda: None)
    with pytest.raises(common.UserError, match="pip install pyautoattack"):
        reproduce.get_args(argv(out) + ["--official-autoattack", "all"])
    with pytest.raises(common.UserError, match="unknown run"):
        reproduce.get_args(argv(out) + ["--official-autoattack", "pgd-at,madry"])
    monkeypatch.setattr(evaluate, "official_autoattack", lambda: NoAttack)
    with_aa = reproduce.main(argv(out) + ["--official-autoattack", "pgd-at,ltd"])
    for r, old in zip(with_aa, rows):
        assert (r["clean"], r["aa_lite"]) == (old["clean"], old["aa_lite"])  # AA-lite's reports were reused
        if r["name"] not in ("pgd-at", "ltd"):
            assert r["autoattack"] is None and not (out / "eval" / f"{r['name']}-s{r['seed']}-autoattack.json").exists()
            continue
        assert r["autoattack"] == r["clean"] and r["autoattack_per_image"] == r["per_image"]["clean"]
        report = json.loads((out / "eval" / f"{r['name']}-s{r['seed']}-autoattack.json").read_text())
        assert report["protocol"].startswith("AutoAttack, official package")
    md = (out / "results.md").read_text()
    assert "| AA-lite | AutoAttack (official, standard) |" in md
    k = with_aa[0]["per_image"]["clean"].count("1")
    assert f"| {with_aa[0]['label']} | 0 | " in md and md.count(f"{100 * k / 8:.1f}% [") >= 2
    assert md.count("| not run |") == len(rows) - 4  # two runs x two seeds have the official column


def test_the_plan_estimate_counts_the_official_autoattack(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "official_autoattack", lambda: object)
    a = reproduce.get_args(argv(tmp_path) + ["--official-autoattack", "pgd-at"])
    runs = reproduce.plan(a)
    for r in runs:
        r["status"] = reproduce.status(r)
    reproduce.estimate(a, runs)
    pgd_at, at_alp_run = runs[0], runs[1]  # same arch and evaluation; only PGD-AT gets the official attack too
    assert (pgd_at["name"], at_alp_run["name"]) == ("pgd-at", "at-alp") and at_alp_run["est_eval"] > 0
    assert pgd_at["est_eval"] == pytest.approx((1 + reproduce.OFFICIAL_AA_COST) * at_alp_run["est_eval"])
