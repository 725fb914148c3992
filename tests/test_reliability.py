"""Runs are never lost and a broken model is never reported as robust: out-dir ownership, finite outputs, safe
load errors, strict resume, failing fast, bad folder data, bad flags, torchrun hygiene. Each test reproduces one
fault a user can hit (tiny synthetic runs, a few seconds each)."""
import argparse
import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import common
import defensive_distillation as dd
import evaluate
from tests.util import TINY, pgd_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = TINY + ["--arch", "papernot-cifar", "--train-size", "32", "--val-size", "16", "--batch-size", "16", "--steps", "1",
        "--optimizer", "sgd", "--weight-decay", "5e-4"]  # SGD: what the resume tests change


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def log_epochs(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


def dead_pid():
    """The PID of a process that has finished (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run (SGD, lr 0.1, lr x0.1 from epoch 2): (out-dir, best.pt)."""
    out = str(tmp_path_factory.mktemp("finished"))
    return out, pgd_at(FAST + ["--epochs", "2", "--out-dir", out])


def copy_run(finished, dst):
    shutil.copytree(finished[0], dst)
    return str(dst)


def trainer_for(extra, method="pgd-at"):
    args = common.base_parser("t").parse_args(FAST + extra)
    run = common.Run(args, method)
    model = run.model()
    opt, sched = run.optimizer(model.parameters())
    return common.Trainer(run, model, opt, sched, method), model


# ------------------------------------------------------------------------- 1. out-dir ownership
def test_a_used_out_dir_is_refused_unless_resume_or_overwrite(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = {f: md5(os.path.join(out, f)) for f in ("best.pt", "last.pt", "log.jsonl")}
    with pytest.raises(common.UserError) as e:
        pgd_at(FAST + ["--epochs", "2", "--seed", "5", "--out-dir", out])
    msg = str(e.value)
    assert "already holds a run (best.pt, last.pt, log.jsonl)" in msg and "--resume" in msg and "--overwrite" in msg
    assert before == {f: md5(os.path.join(out, f)) for f in before}  # nothing of the finished run touched
    pgd_at(FAST + ["--epochs", "1", "--out-dir", out, "--overwrite"])  # an explicit replacement: a clean new run
    assert log_epochs(out) == [1] and common.load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 0


def test_teacher_files_count_as_the_run_unless_a_teacher_is_reused(tmp_path):
    os.makedirs(tmp_path / "teacher")
    (tmp_path / "teacher" / "last.pt").write_bytes(b"x")
    args = argparse.Namespace(out_dir=str(tmp_path), resume=False, overwrite=False, teacher=None)
    with pytest.raises(common.UserError, match=r"already holds a run \(teacher/last.pt\)"):
        common.claim_out_dir(args)
    args.teacher = str(tmp_path / "teacher" / "best.pt")  # stage 1 is not rerun: its files are not this run's
    common.claim_out_dir(args)
    assert (tmp_path / "teacher" / "last.pt").exists()


def test_a_live_lock_refuses_and_a_dead_one_is_taken_over(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{other.pid}\n")
        args = argparse.Namespace(out_dir=str(tmp_path), resume=False, overwrite=False)
        with pytest.raises(common.UserError, match=f"in use by a running process \\(PID {other.pid}"):
            common.claim_out_dir(args)
    finally:
        other.kill()
        other.wait()
    common.claim_out_dir(args)  # its process is gone: the lock is ours now
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_the_default_out_dir_tells_seeds_and_eps_apart():
    parse = lambda *extra: common.base_parser("t").parse_args(FAST + list(extra))
    assert common.default_out_dir("m", parse()) == os.path.join("runs", "m-synthetic-papernot-cifar")
    assert common.default_out_dir("m", parse("--seed", "3", "--eps", "0.0157")) == \
        os.path.join("runs", "m-synthetic-papernot-cifar-seed3-eps0.0157")


# ------------------------------------------------------------------------- 2. finite outputs
def test_a_diverged_model_is_never_saved(tmp_path):
    with pytest.raises(common.UserError, match="outputs NaN/inf on 16 validation images in epoch 1; lower --lr"):
        pgd_at(FAST + ["--train-size", "16", "--optimizer", "adam", "--lr", "1e6", "--out-dir", str(tmp_path)])
    assert not os.path.exists(tmp_path / "best.pt") and not os.path.exists(tmp_path / "last.pt")


def test_nan_after_a_good_epoch_names_the_real_last_good_checkpoint(tmp_path):
    trainer, model = trainer_for(["--out-dir", str(tmp_path)])
    trainer.end_epoch(0, torch.tensor(16.0), 0, 16, time.time())  # a good epoch 1
    saved = {f: md5(tmp_path / f) for f in ("best.pt", "last.pt")}
    with torch.no_grad():
        model.out.weight.fill_(float("nan"))
    with pytest.raises(common.UserError) as e:
        trainer.end_epoch(1, torch.tensor(16.0), 0, 16, time.time())  # finite loss, NaN model
    assert f"nothing of this epoch was saved (last good checkpoint: {tmp_path / 'last.pt'} (epoch 1))" in str(e.value)
    assert saved == {f: md5(tmp_path / f) for f in saved}
    fresh, _ = trainer_for(["--out-dir", str(tmp_path / "new")])
    with pytest.raises(common.UserError, match="no checkpoint of this stage was saved yet"):
        fresh.end_epoch(0, torch.tensor(float("nan")), 0, 16, time.time())


def test_evaluate_refuses_a_model_with_nan_outputs(finished, tmp_path):
    ck = torch.load(finished[1], weights_only=True)
    ck["model"]["out.weight"].fill_(float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    with pytest.raises(common.UserError, match="outputs NaN/inf on 32 of 32 test images: it is broken, not robust"):
        evaluate.main([str(tmp_path / "nan.pt"), "--n", "32", "--device", "cpu", "--quiet"])
    assert not os.path.exists(tmp_path / "nan.eval.json")


def test_evaluate_refuses_settings_that_inflate_robustness_before_attacking(finished, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "cascade", lambda *a, **k: pytest.fail("attacked before checking the flags"))
    base = [finished[1], "--n", "32", "--device", "cpu", "--quiet", "--json", str(tmp_path / "r.json")]
    for extra, match in ((["--alpha", "-0.1"], "--alpha .* must be > 0"), (["--alpha", "0"], "--alpha .* must be > 0"),
                         (["--square-queries", "0"], "--square-queries must be >= 1"),
                         (["--eps", "8"], r"did you mean 8/255 = 0.0314"),
                         (["--json", str(tmp_path / "no" / "r.json")], "--json: the directory .*no does not exist"),
                         (["--examples", str(tmp_path / "no" / "g.png")], "--examples: the directory")):
        with pytest.raises(common.UserError, match=match):
            evaluate.main(base + extra)


# ------------------------------------------------------------------------- 3. safe load errors
def test_unreadable_checkpoints_get_our_own_message(finished, tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(finished[1], "rb") as f:
        good = f.read()
    files = {"empty.pt": b"", "truncated.pt": good[:len(good) // 2], "text.pt": b"not a checkpoint\n",
             "random.pt": os.urandom(4096), "pickle.pt": pickle.dumps(Evil(), protocol=2)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"format": common.CHECKPOINT_FORMAT, "model": Evil()}, tmp_path / "evil.pt")
    reasons = {"empty.pt": "the file is empty", "truncated.pt": "the file is truncated or damaged",
               "text.pt": "not a file written by torch.save", "random.pt": "not a file written by torch.save",
               "pickle.pt": "refused because loading it would run code", "evil.pt": "refused because loading it would run code"}
    for name, reason in reasons.items():
        with pytest.raises(common.UserError) as e:
            common.load_checkpoint(str(tmp_path / name))
        msg = str(e.value)
        assert f"{tmp_path / name} is not a robust-distill checkpoint: {reason}" in msg, msg
        assert "weights_only" not in msg and "\n" not in msg
    assert not marker.exists()
    with pytest.raises(common.UserError, match="the file is empty"):  # and through the command
        evaluate.main([str(tmp_path / "empty.pt")])
    ck = torch.load(finished[1], weights_only=True)
    del ck["arch"]
    torch.save(ck, tmp_path / "no_arch.pt")
    with pytest.raises(common.UserError, match="not a complete robust-distill/1 checkpoint: it lacks arch"):
        common.build_model_from_checkpoint(str(tmp_path / "no_arch.pt"))


def make_tree(root, classes=("a", "b"), n=3, size=(16, 16), ext="png"):
    from PIL import Image
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for j in range(n):
                Image.new("RGB", size, (60 * i, 20 * j, 100)).save(os.path.join(root, split, c, f"{j}.{ext}"))
    return str(root)


def test_a_corrupt_dataset_cache_is_named_and_rebuilt(tmp_path, capsys):
    root = make_tree(tmp_path)
    cache = os.path.join(root, ".robust-distill-train.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    for bad in (lambda: open(cache, "wb").write(os.urandom(2048)), lambda: torch.save({"x": Evil()}, cache)):
        bad()
        (x, y), _ = common.load_dataset("folder", root)
        out = capsys.readouterr().out
        assert len(x) == 6 and f"ignoring the unreadable dataset cache {cache}; delete it" in out
        assert "weights_only" not in out and not (tmp_path / "PWNED").exists()
        assert torch.equal(torch.load(cache, weights_only=True)["x"], x)  # rebuilt


# ------------------------------------------------------------------------- 4. strict resume
def test_resume_refuses_another_runs_last_pt(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = md5(os.path.join(out, "last.pt"))
    for extra, method, wrong in (([], "at_alp", "method pgd-at (this command: at_alp)"),
                                 (["--optimizer", "adam"], "pgd-at", "--optimizer sgd (this command: adam)"),
                                 (["--arch", "wrn-10-1"], "pgd-at", "arch papernot-cifar (this command: wrn-10-1)"),
                                 (["--batch-size", "8"], "pgd-at", "--batch-size 16 (this command: 8)")):
        with pytest.raises(common.UserError) as e:
            trainer_for(extra + ["--epochs", "3", "--out-dir", out, "--resume"], method)
        assert f"last.pt belongs to another run: {wrong}" in str(e.value) and "\n" not in str(e.value)
    assert md5(os.path.join(out, "last.pt")) == before


def test_changed_flags_take_effect_on_resume_and_are_recorded(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    trainer, _ = trainer_for(["--epochs", "2", "--out-dir", out, "--resume"])
    assert trainer.done and "this stage is complete (2/2 epochs)" in capsys.readouterr().out  # not "3/2"
    trainer, _ = trainer_for(["--epochs", "3", "--lr", "0.05", "--momentum", "0.5", "--out-dir", out, "--resume"])
    text = capsys.readouterr().out
    assert "continuing at epoch 3/3" in text and "--lr 0.1 -> 0.05" in text and "--momentum 0.9 -> 0.5" in text
    group = trainer.opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.05 * 0.1) and group["momentum"] == 0.5  # epoch 3: past milestone 1
    assert trainer.sched.base_lrs == [0.05]
    trainer.end_epoch(2, torch.tensor(16.0), 0, 16, time.time())
    ck = common.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["args"]["lr"] == 0.05 and ck["optimizer"]["param_groups"][0]["momentum"] == 0.5
    assert ck["resumes"][-1] == {"at_epoch": 3, "changed": {"epochs": [2, 3], "lr": [0.1, 0.05], "momentum": [0.9, 0.5]}}


def test_resume_keeps_one_log_line_per_epoch_and_removes_stale_temporary_files(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # epoch 3 logged, then killed before its checkpoint
        f.write(json.dumps({"epoch": 3, "loss": 1.0}) + "\n" + '{"epoch": 4, "lo')
    stale = os.path.join(out, f"best.pt.tmp{dead_pid()}")
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")
    trainer_for(["--epochs", "3", "--out-dir", out, "--resume"])
    assert log_epochs(out) == [1, 2] and not os.path.exists(stale)


def test_two_stage_script_resumes_in_either_stage(tmp_path, capsys):
    ddfast = ["--dataset", "synthetic", "--arch", "papernot-mnist", "--device", "cpu", "--batch-size", "32",
              "--val-size", "16", "--train-size", "64", "--optimizer", "adam", "--teacher-epochs", "1",
              "--out-dir", str(tmp_path)]
    dd.main(ddfast + ["--epochs", "1"])
    with pytest.raises(common.UserError, match="already holds a run"):
        dd.main(ddfast + ["--epochs", "1"])
    capsys.readouterr()
    path = dd.main(ddfast + ["--epochs", "2", "--resume"])
    text = capsys.readouterr().out
    assert f"{tmp_path / 'teacher' / 'last.pt'}: this stage is complete (1/1 epochs)" in text
    assert f"{tmp_path / 'last.pt'}: continuing at epoch 2/2" in text
    assert path == str(tmp_path / "best.pt") and log_epochs(tmp_path) == [1, 2] and log_epochs(tmp_path / "teacher") == [1]


# ------------------------------------------------------------------------- 5. fail fast
def test_an_unusable_out_dir_fails_before_any_data_or_training(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "get_loaders", lambda *a, **k: pytest.fail("loaded data for an unusable out-dir"))
    (tmp_path / "afile").write_text("hi")
    with pytest.raises(common.UserError, match="--out-dir .*afile is a file, not a directory"):
        pgd_at(FAST + ["--out-dir", str(tmp_path / "afile")])
    with pytest.raises(common.UserError, match="could not write .*afile/sub"):
        pgd_at(FAST + ["--out-dir", str(tmp_path / "afile" / "sub")])


def test_a_read_only_out_dir_fails_before_training(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes here")
        monkeypatch.setattr(common, "get_loaders", lambda *a, **k: pytest.fail("loaded data for a read-only out-dir"))
        with pytest.raises(common.UserError, match="could not write .*ro/.lock: Permission denied"):
            pgd_at(FAST + ["--out-dir", str(ro)])
    finally:
        ro.chmod(0o755)


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    common.atomic_save({"v": 1}, path)

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(common.UserError, match=f"could not write {path}: no space left on {tmp_path}; the previous"):
        common.atomic_save({"v": 2}, path)

    def stream_error(obj, f):  # what torch.save really raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 158400 vs 158352")
    monkeypatch.setattr(torch, "save", stream_error)
    monkeypatch.setattr(shutil, "disk_usage", lambda d: types.SimpleNamespace(total=100, used=100, free=0))
    with pytest.raises(common.UserError, match=f"no space left on {tmp_path}"):
        common.atomic_save({"v": 2}, path)
    assert torch.load(path, weights_only=True) == {"v": 1} and os.listdir(tmp_path) == ["last.pt"]


# ------------------------------------------------------------------------- 6. folder trees
def test_unreadable_images_are_named_or_skipped(tmp_path, capsys):
    root = make_tree(tmp_path / "t")
    bad = os.path.join(root, "train", "b", "zz.png")
    open(bad, "wb").close()  # zero bytes
    with pytest.raises(common.UserError, match=f"1 file in '{root}/train' cannot be used: {bad} \\(not a readable "
                                               f"image.*--skip-bad-images"):
        common.load_dataset("folder", root)
    (x, _), _ = common.load_dataset("folder", root, skip_bad=True)
    assert len(x) == 6 and f"left out 1 file of '{root}/train', e.g. {bad}" in capsys.readouterr().out
    big = make_tree(tmp_path / "big", size=(80, 80), ext="jpg")  # streamed: checked before any DataLoader
    bad = os.path.join(big, "test", "a", "zz.jpg")
    open(bad, "wb").close()
    with pytest.raises(common.UserError, match=f"1 file in '{big}/test' cannot be used: {bad}"):
        common.load_dataset("folder", big, train=False)


def test_empty_and_single_class_trees_are_refused(tmp_path):
    for empty in ("c", "0empty"):  # whichever way it sorts
        root = make_tree(tmp_path / empty)
        os.makedirs(os.path.join(root, "train", empty))
        with pytest.raises(common.UserError, match=f"class folder {empty} in '{root}/train' holds no images"):
            common.load_dataset("folder", root)
    root = make_tree(tmp_path / "one", classes=("a",))
    with pytest.raises(common.UserError, match="single class folder \\(a\\); a classifier needs at least 2"):
        common.load_dataset("folder", root)


def test_the_majority_size_decides_and_an_odd_image_is_named(tmp_path, capsys):
    from PIL import Image
    root = make_tree(tmp_path / "t", n=4)
    odd = os.path.join(root, "train", "a", "0big.png")  # sorts first: a first-file rule would stream the tree
    Image.new("RGB", (80, 80)).save(odd)
    with pytest.raises(common.UserError, match=f"{odd} \\(80x80 px; most images are 16x16\\)"):
        common.load_dataset("folder", root)
    assert "are 16x16 px: held in memory (small-image path)" in capsys.readouterr().out
    (x, _), info = common.load_dataset("folder", root, skip_bad=True)
    assert x.shape == (8, 3, 16, 16) and not info.large


# ------------------------------------------------------------------------- 7. bad flags
def test_bad_flags_are_one_line_errors():
    parse = lambda *extra: common.base_parser("t").parse_args(FAST + list(extra))
    for extra, match in ((["--epochs", "0"], "--epochs must be >= 1, got 0"), (["--epochs", "-3"], "--epochs must"),
                         (["--lr", "-1"], "--lr must be a finite number > 0, got -1"), (["--lr", "nan"], "got nan"),
                         (["--lr", "inf"], "got inf"), (["--eps", "-1"], r"--eps must be >= 0 and <= 1 \(pixel units"),
                         (["--eps", "2"], r"did you mean 2/255 = 0.0078"), (["--alpha", "0"], "--alpha"),
                         (["--resume", "--overwrite"], "pass one of them"), (["--dist-timeout", "0"], "--dist-timeout")):
        with pytest.raises(common.UserError, match=match):
            parse(*extra)
    with pytest.raises(common.UserError, match="--teacher-epochs must be >= 1, got 0"):
        dd.get_args(["--teacher-epochs", "0"])
    assert parse("--eps", "0").eps == 0  # eps 0: natural training, documented


# ------------------------------------------------------------------------- 8. torchrun
def test_torchrun_sets_a_collective_timeout(tmp_path, monkeypatch):
    seen = []

    def init(backend, **kw):
        seen.append(kw["timeout"])
        raise KeyboardInterrupt  # stop right there
    monkeypatch.setattr(common.dist, "init_process_group", init)
    monkeypatch.setattr(common, "exit_with_launcher", lambda: pytest.fail("not reached"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for extra in ([], ["--dist-timeout", "60"]):
        with pytest.raises(KeyboardInterrupt):
            common.Run(common.base_parser("t").parse_args(FAST + extra + ["--out-dir", str(tmp_path)]), "t")
    assert [t.total_seconds() for t in seen] == [300, 60]


def test_single_process_last_pt_holds_the_rng_state_per_rank(finished):
    rng = common.load_checkpoint(os.path.join(finished[0], "last.pt"))["rng"]
    assert list(rng) == ["cpu"] and len(rng["cpu"]) == 1 and rng["cpu"][0].dtype == torch.uint8


def test_resume_restores_each_ranks_own_rng_and_refuses_another_process_count(finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    states = [torch.Generator().manual_seed(s).get_state() for s in (1, 2)]
    ck["rng"] = {"cpu": states}  # as written by two torchrun processes
    torch.save(ck, os.path.join(out, "last.pt"))
    with pytest.raises(common.UserError, match="processes 2 \\(this command: 1\\)"):
        trainer_for(["--epochs", "3", "--out-dir", out, "--resume"])
    args = common.base_parser("t").parse_args(FAST + ["--epochs", "3", "--out-dir", out, "--resume"])
    run = common.Run(args, "pgd-at")
    run.world, run.rank = 2, 1  # rank 1 of two
    model = run.model()
    opt, sched = run.optimizer(model.parameters())
    common.Trainer(run, model, opt, sched, "pgd-at")
    assert torch.equal(torch.get_rng_state(), states[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_exits_when_its_launcher_dies(tmp_path):
    child = ("import sys, time; sys.path.insert(0, sys.argv[1]); import common; common.exit_with_launcher(); "
             "print('ready', flush=True); time.sleep(120)")
    launcher = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); "
                "print(c.pid, flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", launcher, child, ROOT], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(p.stdout.readline())
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGKILL)  # the launcher dies without a word to its worker
        p.wait()

        def running():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False
        deadline = time.time() + 20
        while running() and time.time() < deadline:
            time.sleep(0.1)
        assert not running()
    finally:
        p.kill()
        p.wait()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
