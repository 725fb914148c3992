"""DistributedDataParallel under torchrun, on the CPU with the gloo backend and 2 processes.

One real launch, `python -m torch.distributed.run --nproc_per_node 2 -m tests.test_distributed OUT`, runs
`worker()` below on both ranks; each rank saves what it saw to OUT/rank<r>.pt and the tests compare them:
  (a) common.Run's TensorLoader shards are disjoint and together cover the training and validation data;
  (b) one optimizer step through run.prepare(model) (DDP, PGD through the wrapper) leaves identical
      parameters on both ranks, equal to a single-process step on the union of the two batches;
  (c) a method script (at_alp.py) run by both ranks on the GPU path (--amp --channels-last: bf16 autocast,
      NHWC) writes its files once (rank 0) and evaluate.py reads the checkpoint like any other;
  (d) InfoARD's per-sample eps_i table stays disjoint per rank while it moves and whole on every rank after;
  (e) on a fresh --data-dir only rank 0 downloads; the others wait for it and read its files (a stand-in for
      torchvision's download, which two processes writing one archive at once break).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from tests.util import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EPOCHS = 2


def fake_download(res):
    """common._torchvision_split with a download in the middle, as torchvision does it: the archive is written in
    place for a while; a second process arriving meanwhile would write the same file (here: it fails loudly)."""
    def split(name, train, root):
        done, writing = os.path.join(root, "archive.done"), os.path.join(root, "archive.writing")
        if not os.path.exists(done):
            os.makedirs(root, exist_ok=True)
            try:
                os.close(os.open(writing, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                raise common.UserError(f"rank {os.environ['RANK']}: another process is downloading into {root}")
            res["downloaded"] = True
            time.sleep(2.0)  # the download
            os.replace(writing, done)
        xtr, ytr, xte, yte = common.synthetic_data(n_train=256, n_test=64)
        return (xtr, ytr) if train else (xte, yte)
    return split


def worker(out):
    """What each rank runs under torchrun (RANK / WORLD_SIZE / MASTER_* come from the launcher)."""
    torch.set_num_threads(1)
    res = {"downloaded": False}
    # (e) the first Run of the job (it initialises the gloo process group) on a data dir nobody has filled yet
    real_split, common._torchvision_split = common._torchvision_split, fake_download(res)
    args = common.base_parser("race", epochs=1).parse_args(
        ["--dataset", "cifar10", "--data-dir", os.path.join(out, "fresh-data"), "--device", "cpu", "--batch-size", "32",
         "--val-size", "32", "--out-dir", os.path.join(out, "race")])
    res["race_train_images"] = len(common.Run(args, "race").train_loader.y)
    common._torchvision_split = real_split
    # (a) shards: labels replaced by sample ids, so the batches themselves tell which images a rank got.
    args = common.base_parser("shards", epochs=1).parse_args(
        TINY + ["--batch-size", "32", "--out-dir", os.path.join(out, "shards")])
    run = common.Run(args, "shards")
    res["rank"], res["world"] = run.rank, run.world
    loader = run.train_loader
    loader.y = torch.arange(len(loader.y))
    for epoch in range(2):
        loader.set_epoch(epoch)
        res[f"train_ids{epoch}"] = torch.cat([y for _, y in loader])
    res["val_idx"] = run.val_loader.indices()
    res["n_train"], res["n_val"] = len(loader.y), len(run.val_loader.y)

    # (b) one PGD-AT step through DDP. Eval-mode BN (per-sample, batch-independent) makes the averaged
    # gradient of two half batches equal to the gradient of the full batch, so the comparison is exact.
    torch.manual_seed(100 + run.rank)  # a different init on each rank: DDP must start from rank 0's
    model = run.model("wrn-10-1").eval()
    res["init_before_wrap"] = [p.detach().clone() for p in model.parameters()]
    ddp = run.prepare(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    xs, ys = torch.rand(run.world, 16, 3, 32, 32, generator=g), torch.randint(10, (run.world, 16), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x_adv = common.pgd(ddp, xs[run.rank], ys[run.rank], 8 / 255, 2 / 255, 3, random_start=False)
    F.cross_entropy(ddp(x_adv), ys[run.rank]).backward()
    opt.step()
    res["after"] = [p.detach().clone() for p in model.parameters()]
    ref = common.model_for("wrn-10-1", run.info)
    ref.load_state_dict(start)
    ref.eval()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    x, y = xs.flatten(0, 1), ys.flatten()
    F.cross_entropy(ref(common.pgd(ref, x, y, 8 / 255, 2 / 255, 3, random_start=False)), y).backward()
    opt.step()
    res["reference"] = [p.detach().clone() for p in ref.parameters()]
    res["start"] = [start[k] for k, _ in model.named_parameters()]

    # A helper module outside DDP (InfoARD's heads) passed to the Trainer must start equal on all ranks.
    head = nn.Linear(8, 4)
    opt, sched = run.optimizer(list(model.parameters()) + list(head.parameters()))
    common.Trainer(run, model, opt, sched, "extra", out_dir=os.path.join(out, "extra"), epochs=0,
                   extra_state={"head": head})
    res["head"] = head.weight.detach().clone()

    # (c) a whole method script, in-process on both ranks.
    import at_alp
    res["best"] = at_alp.main(TINY + ["--epochs", str(EPOCHS), "--amp", "--channels-last",
                               "--out-dir", os.path.join(out, "alp")])

    # (d) InfoARD's eps_i table: each rank moves only its own rows, then all ranks hold the same whole table.
    import infoard
    sync = infoard.StrengthTable.sync

    def spy(table, start):
        res["moved"] = table.eps != start  # this rank's moves, before the ranks exchange them
        sync(table, start)
        res["table"] = table.eps.clone()

    infoard.StrengthTable.sync = spy
    infoard.main(TINY + ["--epochs", "1", "--teacher", res["best"], "--mim", "logit", "--asa-warmup", "0",
                         "--out-dir", os.path.join(out, "infoard")])
    run.train_loader.set_epoch(0)
    res["visited"] = run.train_loader.indices()  # this rank's shard in that run's (only) epoch: same data and seed
    torch.save(res, os.path.join(out, f"rank{run.rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tests.test_distributed", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    return out, p.stdout, res


def test_shards_are_disjoint_and_cover_the_data(ranks):
    _, _, (r0, r1) = ranks
    assert (r0["rank"], r0["world"], r1["rank"], r1["world"]) == (0, 2, 1, 2)
    n = r0["n_train"]
    for epoch in range(2):
        a, b = r0[f"train_ids{epoch}"], r1[f"train_ids{epoch}"]
        assert len(a) == len(b) == n // 2  # equal shards keep the ranks in step
        assert not set(a.tolist()) & set(b.tolist())
        assert sorted(a.tolist() + b.tolist()) == list(range(n))
    assert not torch.equal(r0["train_ids0"], r0["train_ids1"])  # reshuffled every epoch
    va, vb = r0["val_idx"].tolist(), r1["val_idx"].tolist()
    assert sorted(va + vb) == list(range(r0["n_val"])) and not set(va) & set(vb)


def test_ddp_step_averages_gradients(ranks):
    _, _, (r0, r1) = ranks
    assert not torch.equal(r0["init_before_wrap"][0], r1["init_before_wrap"][0])  # the ranks did start apart
    moved = max((a - s).abs().max().item() for a, s in zip(r0["after"], r0["start"]))
    assert moved > 1e-3  # the step did something
    for a, b, ref in zip(r0["after"], r1["after"], r0["reference"]):
        assert torch.equal(a, b)  # the ranks stay identical
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)  # = one step on the union batch


def test_helper_module_in_trainer_starts_identical(ranks):
    _, _, (r0, r1) = ranks
    assert torch.equal(r0["head"], r1["head"])


def test_method_under_torchrun_writes_once_and_evaluates(ranks, tmp_path):
    out, stdout, (r0, r1) = ranks
    alp = os.path.join(out, "alp")
    assert r0["best"] == r1["best"] == os.path.join(alp, "best.pt")
    assert sorted(os.listdir(alp)) == ["best.pt", "last.pt", "log.jsonl"]  # no stray temporary files
    with open(os.path.join(alp, "log.jsonl")) as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert epochs == list(range(1, EPOCHS + 1))  # one line per epoch, not one per rank
    assert stdout.count("[at_alp] epoch 1/") == 1  # only rank 0 prints
    rng = common.load_checkpoint(os.path.join(alp, "last.pt"))["rng"]["cpu"]
    assert len(rng) == 2 and not torch.equal(rng[0], rng[1])  # every rank's own RNG state, for --resume
    args = common.load_checkpoint(r0["best"])["args"]
    assert args["amp"] and args["channels_last"]  # trained on the GPU path
    import evaluate
    report = evaluate.main([r0["best"], "--preset", "quick", "--n", "64", "--device", "cpu",
                            "--json", str(tmp_path / "r.json")])
    assert report["method"] == "at_alp" and 0 <= report["robust_acc"] <= report["clean_acc"] <= 1


def test_rank0_downloads_first_and_the_others_wait(ranks):
    _, _, (r0, r1) = ranks
    assert (r0["downloaded"], r1["downloaded"]) == (True, False)  # rank 1 found rank 0's files
    assert r0["race_train_images"] == r1["race_train_images"] == 256 - 32  # both loaded the data


def test_infoard_strength_table_sharded_then_whole(ranks):
    out, _, (r0, r1) = ranks
    m0, m1 = r0["moved"], r1["moved"]
    assert m0.any() and m1.any()  # both ranks moved some eps_i
    assert not (m0 & m1).any()  # ... never the same one
    own = torch.zeros_like(m0)
    own[r0["visited"]] = True
    assert not (m0 & ~own).any() and not (m1 & own).any()  # each only within its own shard
    assert torch.equal(r0["table"], r1["table"])  # after the epoch: one table on every rank
    eps0 = 8 / 255
    assert torch.equal(r0["table"] != eps0, m0 | m1)  # holding both ranks' moves
    saved = common.load_checkpoint(os.path.join(out, "infoard", "last.pt"))["extra"]["eps_table"]["eps"]
    assert torch.equal(saved, r0["table"])


if __name__ == "__main__":
    worker(sys.argv[1])
