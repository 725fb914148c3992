"""tests.reproduce end to end on synthetic data with tiny budgets: one table row per run with a verdict,
and a second call that reuses every finished checkpoint and evaluation instead of training again."""
import functools
import json
import os

import pytest

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
            "--device", "cpu", "--out-dir", str(out), "--train-args", "--steps 1 --batch-size 32 --val-size 16",
            "--eval-args", "--apgd-iters 2 --square-queries 4 --batch-size 8"]


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    mp = pytest.MonkeyPatch()  # 64 training images - 16 held out = 1 step of 32 per epoch
    mp.setattr(common, "synthetic_data", functools.partial(common.synthetic_data, n_train=64, n_test=32))
    out = tmp_path_factory.mktemp("reproduce")
    rows = reproduce.main(argv(out))
    yield out, rows, mp
    mp.undo()


def test_table_has_one_row_per_run_with_a_verdict(first_call):
    out, rows, _ = first_call
    assert [r["name"] for r in rows] == NAMES
    assert [r["family"] for r in rows] == ["pgdat"] * 2 + ["trades"] * 2 + ["distill"] * 2 + ["dd"] * 2
    for r in rows:
        report = json.loads((out / "eval" / f"{r['name']}.json").read_text())
        assert (r["clean"], r["aa_lite"]) == (report["clean_acc"], report["robust_acc"])
        assert r["verdict"] == report["diagnostics"]["verdict"] and r["verdict"]
        assert r["train_s"] > 0 and r["images_per_s"] > 0 and r["device"].startswith("CPU")
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == len(NAMES)
    for line, r in zip(table, rows):
        assert f"| {r['label']} |" in line and f"{100 * r['aa_lite']:.2f}%" in line
        assert ("masking suspected" in line) == r["masking_suspected"] and "masking" in line
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    # the families share what they must: LTD, RSLAD and InfoARD distil from the TRADES-AWP run's best.pt
    teacher = str(out / "runs" / "trades-awp" / "best.pt")
    for r in rows:
        if r["name"] in ("ltd", "rslad", "infoard"):
            assert r["command"][r["command"].index("--teacher") + 1] == teacher


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
    os.remove(out / "runs" / "at-alp" / "DONE")
    calls = []

    def fake_train(args):
        calls.append(args)
        return str(out / "runs" / "at-alp" / "best.pt")
    monkeypatch.setattr(at_alp, "main", fake_train)
    monkeypatch.setattr(evaluate, "main", lambda args: calls.append(args) or json.loads(
        (out / "eval" / "pgd-at.json").read_text()))
    reproduce.main(argv(out))
    assert len(calls) == 2 and "--resume" in calls[0] and calls[0][calls[0].index("--out-dir") + 1].endswith("at-alp")
    assert calls[1][0].endswith(os.path.join("at-alp", "best.pt"))  # the retrained run is re-evaluated


def test_bad_families_and_dd_on_cifar_are_one_line_errors():
    with pytest.raises(common.UserError, match="unknown family"):
        reproduce.get_args(["--families", "pgdat,fast"])
    with pytest.raises(common.UserError, match="mnist or synthetic"):
        reproduce.get_args(["--dataset", "cifar10", "--families", "dd"])
    assert "dd" not in reproduce.get_args(["--dataset", "cifar10"]).families  # the default just leaves it out
