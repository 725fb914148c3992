"""Foundation tests: attacks, losses, models, augmentation, checkpoints, resume and bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from tests.util import TINY, pgd_at, train_small_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- attacks
@pytest.fixture(scope="module")
def trained_cnn():
    return train_small_cnn()


def test_pgd_lowers_accuracy_of_undefended_model(trained_cnn):
    net, x, y = trained_cnn
    clean = (net(x).argmax(1) == y).float().mean().item()
    adv = common.pgd(net, x, y, 8 / 255, 2 / 255, 10)
    robust = (net(adv).argmax(1) == y).float().mean().item()
    noise = (x + (torch.rand_like(x) * 2 - 1) * 8 / 255).clamp(0, 1)
    noisy = (net(noise).argmax(1) == y).float().mean().item()
    assert clean > 0.7, clean                     # the model learned the data
    assert noisy > clean - 0.1                    # random noise of the same size barely matters ...
    assert robust < clean - 0.3, (clean, robust)  # ... the attack does


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_stays_in_eps_ball_and_image_range(trained_cnn, loss):
    net, x, y = trained_cnn
    x = x[:64]
    x[:8] = 1.0  # saturated pixels: the attack must still stay inside [0, 1]
    target = F.softmax(net(x), 1).detach()
    for eps in (8 / 255, torch.linspace(1 / 255, 16 / 255, len(x))):
        adv = common.pgd(net, x, y[:64], eps, 2 / 255, 5, loss=loss, target=target)
        bound = eps if isinstance(eps, float) else eps.view(-1, 1, 1, 1)
        assert ((adv - x).abs() <= bound + 1e-6).all()
        assert adv.min() >= 0 and adv.max() <= 1
        if not isinstance(eps, float):  # per-sample radii are really used, not just the smallest one
            d = (adv - x).flatten(1).abs().amax(1)
            assert d[-1] > 10 / 255 and d[0] <= 1 / 255 + 1e-6


def test_pgd_custom_loss_and_targeted(trained_cnn):
    net, x, y = trained_cnn
    x, y = x[:64], y[:64]
    target = (y + 1) % 10
    adv = common.pgd(net, x, target, 16 / 255, 2 / 255, 20, targeted=True)
    hit_t = (net(adv).argmax(1) == target).float().mean().item()
    assert hit_t > (net(x).argmax(1) == target).float().mean().item() + 0.3
    # A callable loss sees the model output: maximising logit 3 must raise logit 3.
    adv = common.pgd(net, x, y, 8 / 255, 2 / 255, 5, loss=lambda out, _: out[:, 3])
    assert (net(adv)[:, 3] > net(x)[:, 3]).float().mean() > 0.9


# -------------------------------------------------------------------------------------- models
EXPECTED = {  # arch: (stage channels, pooled dim)
    "resnet18": ([64, 128, 256, 512], 512), "preact-resnet18": ([64, 128, 256, 512], 512),
    "wrn-16-2": ([32, 64, 128], 128), "mobilenetv2": ([24, 32, 96, 1280], 1280),
    "papernot-cifar": ([64, 128], 256), "papernot-mnist": ([32, 64], 200)}


@pytest.mark.parametrize("arch", list(EXPECTED))
@pytest.mark.parametrize("classes", [10, 100])
def test_every_arch_builds_with_documented_shapes(arch, classes):
    ch, size = (1, 28) if arch == "papernot-mnist" else (3, 32)
    model = common.build_model(arch, classes, ch, size, (0.5,) * ch, (0.25,) * ch).eval()
    x = torch.rand(2, ch, size, size)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
    stages, pooled = EXPECTED[arch]
    assert logits.shape == (2, classes)
    assert [s.shape[1] for s in feats["stages"]] == stages
    assert feats["pooled"].shape == (2, pooled)
    if arch != "papernot-mnist":  # CIFAR-style nets halve the resolution from stage to stage
        sizes = [s.shape[-1] for s in feats["stages"]]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] in (32, 14)


def test_wrn_34_10_has_the_paper_parameter_count():
    model = common.build_model("wrn-34-10", 10)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 46.16) < 0.01


def test_normalisation_lives_inside_the_model():
    model = common.build_model("wrn-10-1", 10, mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.1)).eval()
    x = torch.rand(4, 3, 32, 32)
    xn = (x - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.1]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.body(xn)[0], atol=1e-5)
    assert "mean" in model.state_dict() and "std" in model.state_dict()
    model.temperature = 4.0
    with torch.no_grad():
        assert torch.allclose(model(x), model.body(xn)[0] / 4, atol=1e-5)


# -------------------------------------------------------------------------------- data & augment
def test_augmentation_keeps_shape_dtype_and_really_crops_and_flips():
    torch.manual_seed(0)
    x = torch.randint(1, 255, (256, 3, 32, 32), dtype=torch.uint8)  # no zero pixels before padding
    out = common.augment(x, pad=4, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out == 0).flatten(1).any(1).float().mean() > 0.8  # shifted images show the zero padding
    out = common.augment(x, pad=0, flip=True)  # flips only: each image is itself or its mirror
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | flipped).all() and 0.3 < flipped.float().mean() < 0.7
    out = common.augment(x[:16], pad=4, flip=False)  # crops only (MNIST): each is a window of the padded image
    offsets = []
    for i in range(16):
        xp = F.pad(x[i], (4, 4, 4, 4))
        offsets += [(a, b) for a in range(9) for b in range(9) if (xp[:, a:a + 32, b:b + 32] == out[i]).all()]
    assert len(offsets) == 16 and len(set(offsets)) > 8  # every crop found, at many different offsets


def test_loader_batches_are_float_images_and_shards_cover_data():
    x = torch.arange(100).view(100, 1, 1, 1).expand(100, 1, 4, 4).to(torch.uint8).contiguous()
    y = torch.arange(100)
    seen = []
    for rank in range(2):
        loader = common.TensorLoader(x, y, 10, "cpu", train=True, rank=rank, world=2)
        for xb, yb in loader:
            assert xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
            seen += yb.tolist()
    assert sorted(seen) == list(range(100))  # disjoint shards that cover the data


def test_loader_yields_sample_indices_only_when_asked():
    x = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    y = torch.randint(10, (50,))
    loader = common.TensorLoader(x, y, 8, "cpu", train=True)
    loader.augment = False
    assert all(len(b) == 2 for b in loader)  # the default: (x, y), every other training loop unchanged
    loader.with_index = True
    loader.set_epoch(3)
    idx = torch.cat([j for _, _, j in loader])
    assert len(set(idx.tolist())) == len(idx) == 48 and not torch.equal(idx, torch.arange(48))  # shuffled
    for xb, yb, j in loader:
        assert torch.equal(xb, x[j].float() / 255) and torch.equal(yb, y[j])  # idx points at the batch's samples


def test_no_augment_flag_reaches_the_train_loader():
    args = common.base_parser("t").parse_args(TINY + ["--no-augment"])
    train, _, _, _ = common.get_loaders(args, "cpu")
    xb, yb = next(iter(train))
    pool = train.x.float() / 255
    assert all(any(torch.equal(img, p) for p in pool) for img in xb[:4])  # batches are unmodified images
    args = common.base_parser("t").parse_args(TINY)
    train, _, _, _ = common.get_loaders(args, "cpu")
    assert train.augment


def test_folder_dataset_decodes_caches_and_splits(tmp_path):
    from PIL import Image
    for split, n in (("train", 6), ("test", 2)):
        for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            os.makedirs(tmp_path / split / c)
            for i in range(n):
                Image.new("RGB", (16, 16), colour).save(tmp_path / split / c / f"{i}.png")
    (x, y), info = common.load_dataset("folder", str(tmp_path), train=True)
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8 and info.classes == ["cat", "dog"]
    assert (y == 0).sum() == 6 and x[y == 0][:, 0].float().mean() > 150
    assert os.path.exists(tmp_path / ".robust-distill-train.pt")
    (x2, y2), _ = common.load_dataset("folder", str(tmp_path), train=True)  # from the cache
    assert torch.equal(x, x2) and torch.equal(y, y2)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"not an image")  # stray files are skipped
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "train" / "dog" / "new.png")
    (x3, y3), _ = common.load_dataset("folder", str(tmp_path), train=True)  # a changed tree is decoded again
    assert len(x3) == 13 and (y3 == 1).sum() == 7


def test_large_image_folder_streams_through_a_dataloader(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            for i in range(6):
                Image.new("RGB", (80, 96), (40 * i, 100, 200)).save(tmp_path / split / c / f"{i}.jpg")
    (ds, labels), info = common.load_dataset("folder", str(tmp_path), train=True)
    assert labels is None and info.large and info.size == 224 and info.eps == pytest.approx(4 / 255)
    args = common.base_parser("t").parse_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--batch-size", "4",
                                               "--val-size", "2", "--workers", "0"])
    train, val, test, _ = common.get_loaders(args, "cpu")
    assert isinstance(train, common.StreamLoader)
    xb, yb = next(iter(train))
    assert xb.shape == (4, 3, 224, 224) and 0 <= xb.min() and xb.max() <= 1 and yb.dtype == torch.long
    assert sum(len(y) for _, y in val) == 2 and sum(len(y) for _, y in test) == 12
    assert len(train) == (12 - 2) // 4  # held-out validation images are not trained on


@pytest.mark.skipif(not os.environ.get("CIFAR10_JPEG_DIR"), reason="set CIFAR10_JPEG_DIR to an unpacked CIFAR-10 tree")
def test_real_cifar10_jpeg_folder():
    root = os.environ["CIFAR10_JPEG_DIR"]
    (x, y), info = common.load_dataset("folder", root, train=True)
    (xt, yt), _ = common.load_dataset("folder", root, train=False)
    assert x.shape == (50000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert info.num_classes == 10 and not info.large and info.eps == pytest.approx(8 / 255)
    assert torch.bincount(y).tolist() == [5000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    # normalisation statistics of the whole set (JPEG moves them a little), not of the first class read
    assert all(abs(a - b) < 0.01 for a, b in zip(info.mean + info.std, common.CIFAR_MEAN + common.CIFAR_STD))


def test_piecewise_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = common.make_schedule(opt, "piecewise", 200, 10, [100, 150], 0.1)
    lrs = []
    for it in range(200 * 10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[999] == pytest.approx(0.1) and lrs[1000] == pytest.approx(0.01) and lrs[1500] == pytest.approx(0.001)


# ------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    path = pgd_at(TINY + ["--out-dir", str(out), "--epochs", "2"])
    return out, path


def test_checkpoint_round_trip(trained_run):
    out, path = trained_run
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == common.CHECKPOINT_FORMAT
    for key in ("model", "arch", "dataset", "num_classes", "temperature", "method", "args", "epoch", "metrics"):
        assert key in ckpt
    model, _ = common.build_model_from_checkpoint(path)
    ref = common.build_model("wrn-10-1", 10, mean=(0.5,) * 3, std=(0.25,) * 3)
    ref.load_state_dict(ckpt["model"])
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))
    lines = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"loss", "train_acc", "val_clean", "val_pgd10", "lr", "seconds", "images_per_s", "eta_s"} <= set(lines[0])
    assert [r["lr"] for r in lines] == pytest.approx([0.1, 0.01])  # the lr each epoch trained at (--milestones 1)
    # the selection metric itself (not the internal tie-break score), and what the train accuracy is measured on
    best = max(range(2), key=lambda i: (lines[i]["val_pgd10"], lines[i]["val_clean"], -i))
    assert "best" not in lines[1] and lines[1]["train_on"] == "adv"
    assert (lines[1]["best_epoch"], lines[1]["best_val_pgd10"]) == (best + 1, lines[best]["val_pgd10"])
    assert ckpt["metrics"]["best_epoch"] == best + 1  # best.pt is that epoch


def test_resume_continues_at_the_right_epoch_with_same_optimizer_state(trained_run, tmp_path):
    out, _ = trained_run
    saved = torch.load(out / "last.pt", weights_only=True)
    args = common.base_parser("t", epochs=3).parse_args(TINY + ["--out-dir", str(out), "--epochs", "3", "--resume"])
    run = common.Run(args, "pgd-at")
    model = run.model()
    opt, sched = run.optimizer(model.parameters())
    trainer = common.Trainer(run, model, opt, sched, "pgd-at")
    assert list(trainer.epochs_to_run()) == [2]
    bufs = [s["momentum_buffer"] for s in opt.state_dict()["state"].values()]
    want = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
    assert len(bufs) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(bufs, want))
    assert sched.last_epoch == saved["schedule"]["last_epoch"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved["model"].values()))
    assert trainer.best == saved["best_score"] and trainer.best_metrics["best_epoch"] == saved["metrics"]["best_epoch"]


def test_interrupted_write_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    common.atomic_save({"format": common.CHECKPOINT_FORMAT, "v": torch.ones(3)}, path)

    def crash(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_save({"v": torch.zeros(3)}, path)
    assert torch.equal(common.load_checkpoint(path)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(common.UserError, match="unknown dataset 'imagenet-42'"):
        common.load_dataset("imagenet-42")
    with pytest.raises(common.UserError, match="unknown arch 'resnet-9000'"):
        common.build_model("resnet-9000", 10)
    with pytest.raises(common.UserError, match="checkpoint not found: .*nope.pt"):
        common.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(common.UserError, match="bad.pt is not a robust-distill checkpoint: not a file written by torch"):
        common.load_checkpoint(str(tmp_path / "bad.pt"))
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(common.UserError, match="not a robust-distill/1 checkpoint"):
        common.load_checkpoint(str(tmp_path / "foreign.pt"))
    os.makedirs(tmp_path / "tree" / "test" / "a")
    with pytest.raises(common.UserError, match="has no 'train/' directory"):
        common.load_dataset("folder", str(tmp_path / "tree"))


def test_arch_mismatch_and_nan_loss_give_clear_errors(trained_run, tmp_path):
    out, path = trained_run
    ckpt = torch.load(path, weights_only=True)
    ckpt["arch"] = "wrn-16-2"  # weights of a wrn-10-1 under another arch's name
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(common.UserError, match="checkpoint weights do not fit arch 'wrn-16-2'"):
        common.build_model_from_checkpoint(str(tmp_path / "mismatch.pt"))
    args = common.base_parser("t").parse_args(TINY + ["--out-dir", str(tmp_path / "nan")])
    run = common.Run(args, "pgd-at")
    model = run.model()
    opt, sched = run.optimizer(model.parameters())
    trainer = common.Trainer(run, model, opt, sched, "pgd-at")
    with pytest.raises(common.UserError, match="training loss became nan in epoch 1; lower --lr"):
        trainer.end_epoch(0, torch.tensor(float("nan")), 0, 64, 0.0)
    assert not os.path.exists(tmp_path / "nan" / "best.pt")  # nothing overwritten with a broken model


def test_impossible_batch_and_validation_sizes_are_clear_errors():
    with pytest.raises(common.UserError, match="--batch-size 1024 is larger than the 448 training images"):
        common.get_loaders(common.base_parser("t").parse_args(TINY + ["--batch-size", "1024"]), "cpu")
    with pytest.raises(common.UserError, match="--val-size must be at least 1"):
        common.get_loaders(common.base_parser("t").parse_args(TINY + ["--val-size", "0"]), "cpu")


def test_train_size_takes_a_subset_per_seed_and_refuses_bad_values():
    args = lambda *extra: common.base_parser("t").parse_args(TINY + list(extra))
    full, _, _, _ = common.get_loaders(args(), "cpu")  # synthetic: 512 images, 64 held out
    sub, val, _, _ = common.get_loaders(args("--train-size", "100"), "cpu")
    same, _, _, _ = common.get_loaders(args("--train-size", "100"), "cpu")
    other, val3, _, _ = common.get_loaders(args("--train-size", "100", "--seed", "3"), "cpu")
    assert len(full.y) == 448 and len(sub.y) == 100 and len(val.y) == 64
    assert torch.equal(sub.x, same.x) and not torch.equal(sub.x, other.x)  # the seed draws the subset
    assert torch.equal(val.x, val3.x)  # the held-out validation images do not move with the seed
    rows = {tuple(r.flatten().tolist()) for r in full.x}
    assert all(tuple(r.flatten().tolist()) in rows for r in sub.x)  # drawn from the training part, not validation
    for bad in ("449", "0", "-5"):
        with pytest.raises(common.UserError) as e:
            common.get_loaders(args("--train-size", bad), "cpu")
        msg = str(e.value)
        assert f"got {bad}" in msg and "between 1 and 448" in msg and "512 training images" in msg and "\n" not in msg


def test_models_know_their_input_shape():
    m = common.build_model("papernot-mnist", 10).eval()  # MNIST's 1x28x28 without being told
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"papernot-mnist expects inputs of shape \(N, 1, 28, 28\), "
                                         r"got \(2, 3, 32, 32\)"):
        m(torch.rand(2, 3, 32, 32))
    r = common.build_model("wrn-10-1", 10).eval()  # CIFAR's 3x32x32; global pooling takes any H, W
    assert r(torch.rand(1, 3, 40, 40)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"wrn-10-1 expects inputs of shape \(N, 3, H, W\), got \(1, 1, 28, 28\)"):
        r(torch.rand(1, 1, 28, 28))


def test_per_dataset_defaults_apply_only_where_not_given():
    p = lambda: common.base_parser("t", arch="wrn-34-10", epochs=200, per_dataset={"mnist": {"epochs": 7}})
    a = p().parse_args(["--dataset", "mnist"])
    assert (a.arch, a.epochs, a.optimizer, a.lr, a.eps_warmup) == ("papernot-mnist", 7, "adam", 1e-3, 1)
    a = p().parse_args(["--dataset", "mnist", "--arch", "wrn-10-1", "--optimizer", "sgd", "--eps-warmup", "0"])
    assert (a.arch, a.optimizer, a.lr, a.eps_warmup) == ("wrn-10-1", "sgd", 0.1, 0)
    a = p().parse_args(["--dataset", "cifar10"])
    assert (a.arch, a.epochs, a.optimizer, a.lr, a.eps_warmup) == ("wrn-34-10", 200, "sgd", 0.1, 0)


def test_per_arch_defaults_fill_what_neither_the_user_nor_the_dataset_table_sets():
    p = lambda: common.base_parser("t", arch="wrn-34-10", weight_decay=2e-4)
    a = p().parse_args(["--dataset", "cifar10", "--arch", "papernot-cifar"])  # BN-free: Adam 1e-3, no decay
    assert (a.optimizer, a.lr, a.weight_decay) == ("adam", 1e-3, 0.0)
    a = p().parse_args(["--arch", "papernot-cifar", "--optimizer", "sgd", "--weight-decay", "5e-4"])
    assert (a.optimizer, a.lr, a.weight_decay) == ("sgd", 0.1, 5e-4)  # a flag the user passes wins
    a = p().parse_args(["--arch", "resnet18"])
    assert (a.optimizer, a.lr, a.weight_decay) == ("sgd", 0.1, 2e-4)  # other archs: the method's defaults
    a = p().parse_args(["--dataset", "mnist", "--arch", "papernot-cifar"])
    assert (a.optimizer, a.epochs, a.milestones) == ("adam", 10, [8])


def test_help_lists_the_methods_own_flags_first_each_with_help(monkeypatch, capsys):
    import at_alp, defensive_distillation, infoard, ltd
    parsers, parse = [], common._Parser.parse_known_args
    monkeypatch.setattr(common._Parser, "parse_known_args", lambda self, *a, **k: parsers.append(self) or parse(self, *a, **k))
    for module, own in ((ltd, "--tau-t"), (at_alp, "--alp"), (infoard, "--asa"), (defensive_distillation, "--temperature")):
        with pytest.raises(SystemExit):
            module.get_args(["--help"])
        text = capsys.readouterr().out
        shared = text.index("shared by every method script:")
        assert text.index(f"  {own} ") < shared < text.index("  --dataset ") and text.index("  --gamma ") > shared
        assert "(default: None)" not in text and "default: 0.1 with SGD, 1e-3 with Adam (default" not in text
        assert [a.dest for a in parsers[-1]._actions if not a.help] == []


def test_start_line_stage_end_and_evaluate_hint(tmp_path, capsys):
    args = common.base_parser("t", epochs=3).parse_args(TINY + ["--out-dir", str(tmp_path)])
    run = common.Run(args, "pgd-at")
    model = run.model()
    opt, sched = run.optimizer(model.parameters())
    trainer = common.Trainer(run, model, opt, sched, "pgd-at", stage="1/2 (teacher)")
    assert capsys.readouterr().out.splitlines() == [
        f"[pgd-at] start stage 1/2 (teacher): arch wrn-10-1, dataset synthetic, device cpu, float32, 3 epochs, "
        f"out-dir {tmp_path}"]
    trainer.end_epoch(0, torch.tensor(2.0 * 64), 8, 64, 0.0)
    path = run.done(trainer.finish())
    lines = capsys.readouterr().out.splitlines()
    assert "train (adv) 12.50%" in lines[0] and lines[1].startswith("[pgd-at] best.pt: epoch 1, val pgd10 ")
    assert lines[1].endswith(f"-> {path}") and lines[2] == f"[pgd-at] done: {path}"
    assert lines[3].startswith(f"evaluate it: python evaluate.py {path} --preset quick --n 200")


def test_eps_warmup_ramps_linearly(tmp_path):
    args = common.base_parser("t").parse_args(TINY + ["--eps-warmup", "2", "--eps", "0.2", "--alpha", "0.04",
                                                      "--out-dir", str(tmp_path)])
    run = common.Run(args, "t")  # 448 images / batch 64 = 7 batches per epoch
    assert run.eps_at(0, 6) == pytest.approx((0.1, 0.02))
    assert run.eps_at(1, 6) == pytest.approx((0.2, 0.04)) and run.eps_at(5, 0) == pytest.approx((0.2, 0.04))
    assert run.eps_at(0, 0)[0] == pytest.approx(0.2 / 14)


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "missing.pt")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'missing.pt'}"]


def test_unsafe_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"format": common.CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(common.UserError, match="refused because loading it would run code"):
        common.load_checkpoint(str(tmp_path / "evil.pt"))


def test_negative_eps_warmup_and_zero_batch_are_one_line_errors(tmp_path):
    with pytest.raises(common.UserError, match="--eps-warmup must be >= 0"):
        common.base_parser("x").parse_args(["--eps-warmup", "-1"])
    with pytest.raises(common.UserError, match="--batch-size must be at least 1"):
        pgd_at([a if a != "64" else "0" for a in TINY[:8]] + TINY[8:] + ["--out-dir", str(tmp_path)])
