"""Large images: torchvision's ImageNet networks inside our Classifier, predictable memory, and the GPU
start-up decisions (bf16 only where native, one GPU per torchrun process, SyncBatchNorm), on the CPU.

Training runs use a tiny 64-px image-folder tree (64 px is where the ImageNet definitions start); 224 px only
for single forwards.
"""
import json
import os
import sys
import time
import urllib.error

import pytest
import torch
import torch.nn as nn

import at_alp
import common
import evaluate
from tests.util import DEVICE, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20
# Stage maps at 224 px as TorchvisionNet documents them: (channels, side) per stage; pooled size.
STAGES_224 = {
    "resnet18": ([(64, 56), (128, 28), (256, 14), (512, 7)], 512),
    "resnet50": ([(256, 56), (512, 28), (1024, 14), (2048, 7)], 2048),
    "wide_resnet50_2": ([(256, 56), (512, 28), (1024, 14), (2048, 7)], 2048),
    "mobilenet_v2": ([(24, 56), (32, 28), (96, 14), (1280, 7)], 1280),
}


@pytest.fixture(scope="module")
def tree64(tmp_path_factory):
    """A 2-class 64-px folder tree: 3 training images per class (one of the 6 held out for validation, so batch 4
    is one step), 2 test images per class."""
    from PIL import Image
    root = tmp_path_factory.mktemp("tree64")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(n):
                base = torch.full((64, 64, 3), 60 if c == "a" else 190, dtype=torch.int16)
                noise = torch.randint(-40, 40, (64, 64, 3), generator=g, dtype=torch.int16)
                Image.fromarray((base + noise).clamp(0, 255).to(torch.uint8).numpy()).save(root / split / c / f"{i}.png")
    return str(root)


def test_imagenet_only_archs_refuse_images_their_stem_would_collapse():
    for arch in common.IMAGENET_ONLY:
        with pytest.raises(common.UserError, match=r"32-px images would collapse to a 1x1 map; it needs 64 px or more"):
            common.build_model(arch, 10, 3, 32)


def test_resnet18_and_mobilenetv2_pick_their_definition_by_image_size():
    for arch, small, large in (("resnet18", common.ResNet18, "ResNet"), ("mobilenetv2", common.MobileNetV2, "MobileNetV2")):
        m32, m64 = common.build_model(arch, 10, 3, 32), common.build_model(arch, 10, 3, 64)
        assert type(m32) is small and not m32.imagenet_stem
        assert isinstance(m64, common.TorchvisionNet) and type(m64.net).__name__ == large and m64.imagenet_stem
    with pytest.raises(common.UserError, match="needs 64 px or more"):  # forcing the ImageNet stem at 32 px
        common.build_model("resnet18", 10, 3, 32, imagenet_stem=True)
    assert type(common.build_model("resnet18", 10, 3, 224, imagenet_stem=False)) is common.ResNet18


def test_checkpoints_without_the_field_rebuild_our_cifar_definitions():
    """Every checkpoint written before the field existed holds one of our CIFAR definitions, at any size."""
    for arch, size in (("resnet18", 32), ("mobilenetv2", 224)):
        model = common.build_model(arch, 10, 3, size, imagenet_stem=False)
        ck = {"format": common.CHECKPOINT_FORMAT, "model": model.state_dict(), "arch": arch, "num_classes": 10,
              "in_channels": 3, "image_size": size, "temperature": 1.0, "dataset": "synthetic", "method": "pgd-at",
              "args": {}, "epoch": 0, "metrics": {}}
        rebuilt, _ = common.build_model_from_checkpoint(ck)
        assert type(rebuilt) is type(model) and not rebuilt.imagenet_stem


@pytest.mark.parametrize("arch", list(STAGES_224))
def test_imagenet_arch_builds_at_224_with_documented_stages(arch):
    with torch.device("meta"):  # shapes only: no weights to initialise, no arithmetic
        model = common.build_model(arch, 17, 3, 224).eval()
        logits, feats = model(torch.rand(1, 3, 224, 224), return_features=True)
    stages, pooled = STAGES_224[arch]
    assert isinstance(model, common.TorchvisionNet) and model.imagenet_stem and logits.shape == (1, 17)
    assert [(s.shape[1], s.shape[2], s.shape[3]) for s in feats["stages"]] == [(c, h, h) for c, h in stages]
    assert feats["pooled"].shape == (1, pooled)


# wide_resnet50_2 takes TorchvisionNet's ResNet path as resnet50 does, at ~3x the CPU time (25 s): left out here.
@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2", "resnet50"])
def test_imagenet_arch_trains_on_64px_folder_and_round_trips_into_evaluate(arch, tree64, tmp_path, monkeypatch):
    out = tmp_path / "run"
    best = at_alp.main(["--dataset", "folder", "--data-dir", tree64, "--arch", arch, "--epochs", "1", "--batch-size",
                        "4", "--val-size", "1", "--steps", "1", "--device", DEVICE, "--out-dir", str(out)])
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["loss"]))
    ck = common.load_checkpoint(best)
    assert ck["arch"] == arch and ck["imagenet_stem"] is True and ck["image_size"] == 64
    assert common.load_checkpoint(str(out / "last.pt"))["optimizer"]["state"]  # momentum buffers: a step was taken
    built, rebuild = [], common.build_model_from_checkpoint
    monkeypatch.setattr(common, "build_model_from_checkpoint", lambda *a, **k: built.append(rebuild(*a, **k)) or built[-1])
    report = evaluate.main([best, "--attacks", "fgsm", "--device", DEVICE, "--quiet", "--json", str(tmp_path / "r.json")])
    assert report["arch"] == arch and report["n"] == 4 and 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
    model = built[0][0]
    assert isinstance(model, common.TorchvisionNet)  # the same network, every weight in place (a strict load)
    (x, y), _ = common.load_dataset("folder", tree64, train=False)
    with torch.no_grad():
        z = model(x.float().div(255).to(model.mean.device))
    assert report["clean_acc"] == (z.argmax(1).cpu() == y).float().mean().item()
    if arch not in common.IMAGENET_ONLY:  # the recorded choice is what rebuilds it: our definition does not fit
        with pytest.raises(common.UserError, match="do not fit"):
            rebuild({**ck, "imagenet_stem": False})


def test_pretrained_uses_torchvision_weights_and_fails_clearly_offline(tmp_path, monkeypatch):
    import torchvision.models as tvm
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: nothing downloaded before counts

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    import torch.hub
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(common.UserError) as e:
        common.build_model("mobilenet_v2", 5, 3, 224, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "ImageNet weights for mobilenet_v2" in msg and "drop --pretrained" in msg
    with pytest.raises(common.UserError, match="exist for the ImageNet definitions only"):
        common.build_model("wrn-10-1", 10, pretrained=True)
    # With the weights in torchvision's cache (as after one online run), they are used; the head is new.
    weights = tvm.get_model_weights("mobilenet_v2").DEFAULT
    torch.manual_seed(3)
    reference = tvm.mobilenet_v2().state_dict()
    os.makedirs(tmp_path / "hub" / "checkpoints", exist_ok=True)
    torch.save(reference, tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url))
    model = common.build_model("mobilenet_v2", 5, 3, 224, pretrained=True)
    assert torch.equal(model.net.features[0][0].weight, reference["features.0.0.weight"])
    assert model.net.classifier[-1].out_features == 5
    assert torch.allclose(model.mean.flatten(), torch.tensor(common.IMAGENET_MEAN))  # the weights' statistics


# ------------------------------------------------------------------------------------------------ memory
def test_activation_bytes_counts_outputs_and_saved_tensors_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    outputs, saved = common.activation_bytes(net, (3, 8, 8))
    assert outputs == (4 * 8 * 8 + 4 * 8 * 8) * 4  # conv output + relu output, float32
    assert saved == (3 * 8 * 8 + 4 * 8 * 8) * 4  # conv keeps its input (weights excluded), relu its result


def test_layer_outputs_per_image_at_224():
    ours = common.build_model("resnet18", 10, 3, 224, imagenet_stem=False)  # our CIFAR stem at full resolution
    tv = common.build_model("resnet18", 10, 3, 224)
    out_ours, _ = common.activation_bytes(ours.eval(), (3, 224, 224))
    out_tv, saved_tv = common.activation_bytes(tv.eval(), (3, 224, 224))
    assert out_tv < 60 * MIB < 200 * MIB < out_ours  # torchvision's: ~29 MiB; ours: ~265 MiB
    assert 10 * MIB < saved_tv < out_tv


def test_batch_that_fits_follows_the_documented_rule():
    # 1 MiB saved per image, no weights, a 10 GB GPU: 0.9 * 10e9 - 2**30 = 7,926,258,176 bytes for activations,
    # at PEAK_PER_SAVED = 1.5 -> 1.5 MiB per image (eval) or 3 MiB per batch element ([x; x'], training).
    assert common.PEAK_PER_SAVED == 1.5
    assert common.batch_that_fits(MIB, 0, 10 ** 10) == 5039
    assert common.batch_that_fits(MIB, 0, 10 ** 10, train=True) == 2519
    # 2**28 weights of 4 bytes: once for evaluation (1 GiB), four times for training (weights, gradients, momentum,
    # a copy: 4 GiB). (7,926,258,176 - 2**30) / 1.5 MiB = 4356.7; (7,926,258,176 - 2**32) / 3 MiB = 1154.4
    assert common.batch_that_fits(MIB, 2 ** 28, 10 ** 10) == 4356
    assert common.batch_that_fits(MIB, 2 ** 28, 10 ** 10, train=True) == 1154
    assert common.batch_that_fits(10 ** 12, 0, 10 ** 10) == 0


def test_evaluate_picks_a_smaller_default_batch_for_large_images():
    info = lambda size: common.DataInfo("folder", 10, 3, size, (0.5,) * 3, (0.25,) * 3)
    mnv2 = common.build_model("mobilenet_v2", 10, 3, 224).eval()
    assert evaluate.default_batch_size([mnv2], info(224)) < 200  # ~75 MiB saved per image at 224 px
    small = common.build_model("wrn-10-1", 10).eval()
    assert evaluate.default_batch_size([small], info(32)) == evaluate.DEFAULT_BATCH


def test_out_of_memory_names_the_batch_size_to_try(tmp_path, monkeypatch):
    ckpt = tmp_path / "m.pt"
    model = common.build_model("wrn-10-1", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    common.atomic_save({"format": common.CHECKPOINT_FORMAT, "model": model.state_dict(), "arch": "wrn-10-1",
                        "dataset": "synthetic", "num_classes": 10, "in_channels": 3, "image_size": 32,
                        "temperature": 1.0, "method": "t", "args": {}, "epoch": 0, "metrics": {}}, str(ckpt))

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluate, "cascade", oom)
    with pytest.raises(common.UserError) as e:
        evaluate.main([str(ckpt), "--attacks", "fgsm", "--batch-size", "300", "--device", "cpu", "--quiet"])
    assert "out of GPU memory at --batch-size 300: try --batch-size 150" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------- precision and devices
def stub_gpu(monkeypatch, capability, count=2):
    """A machine whose CUDA devices have `capability`; torch.cuda.is_bf16_supported() says True (as it does on
    a T4 or V100, counting emulation) unless including_emulation=False."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    monkeypatch.setattr(torch.version, "hip", None)


def test_bf16_only_where_native(monkeypatch, tmp_path):
    cuda = torch.device("cuda", 0)
    stub_gpu(monkeypatch, (7, 5))  # a T4
    assert not common.native_bf16(cuda)
    assert common.precision_label(cuda) == ("float32 (no native bf16 on this GPU, compute capability 7.5; "
                                            "--amp forces bf16 autocast)")
    assert common.precision_label(cuda, True) == "bf16 autocast (--amp)"
    stub_gpu(monkeypatch, (8, 0))  # an A100
    assert common.native_bf16(cuda) and common.precision_label(cuda) == "bf16 autocast (native on this GPU)"
    assert not common.native_bf16("cpu") and common.precision_label("cpu") == "float32"
    # Run's default precision is that decision (its device is the CPU here, so the decision is stubbed too)
    for native in (False, True):
        monkeypatch.setattr(common, "native_bf16", lambda device, native=native: native)
        args = common.base_parser("t", epochs=1).parse_args(TINY + ["--device", "cpu", "--out-dir", str(tmp_path)])
        run = common.Run(args, "t")
        assert run.amp is native and args.amp is native
        assert run.precision == ("bf16 autocast (native on this GPU)" if native else "float32")


def test_one_gpu_per_torchrun_process(monkeypatch):
    stub_gpu(monkeypatch, (8, 0), count=2)
    assert common.pick_device(None, world=2, local_rank=1) == torch.device("cuda", 1)
    assert common.pick_device("cuda", world=2, local_rank=0) == torch.device("cuda", 0)
    assert common.pick_device("cuda:1") == torch.device("cuda", 1)  # one process: any GPU
    assert common.pick_device("cpu", world=2, local_rank=1) == torch.device("cpu")
    with pytest.raises(common.UserError, match="would put all 2 processes on one GPU"):
        common.pick_device("cuda:0", world=2, local_rank=1)
    with pytest.raises(common.UserError, match="must not exceed the GPUs"):
        common.pick_device("cuda", world=4, local_rank=3)


def test_sync_bn_converts_batchnorm_under_torchrun_only_on_gpus(tmp_path, monkeypatch):
    args = common.base_parser("t", epochs=1).parse_args(TINY + ["--device", "cpu", "--sync-bn", "--out-dir", str(tmp_path)])
    run = common.Run(args, "t")
    model = run.model()
    assert run.prepare(model) is model  # one process: nothing to synchronise
    run.world = 2
    with pytest.raises(common.UserError, match="--sync-bn needs CUDA GPUs"):
        run.prepare(model)
    keys = list(model.state_dict())
    monkeypatch.setattr(run, "device", torch.device("cuda", 0))  # a stand-in: conversion needs no GPU, DDP does
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda m, **k: m)
    assert run.prepare(model) is model
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == keys  # the checkpoint of a --sync-bn run loads into the plain model
    rebuilt, _ = common.build_model_from_checkpoint(common.make_checkpoint(model, args, run.info, "t", 0, {}))
    assert all(type(m) is not nn.SyncBatchNorm for m in rebuilt.modules())


def test_gpu_check_dry_run_prints_a_plan_within_its_budget(capsys, monkeypatch):
    from tests import bench, gpu_check
    steps = gpu_check.main(["--dry-run", "--out", "/nonexistent/g.json", "--data-dir", "/data/cifar10"])
    out = capsys.readouterr().out
    assert sum(s[1] for s in steps) <= gpu_check.BUDGET_S == 600
    assert f"({sum(s[1] for s in steps)} s of step limits, budget 600 s" in out
    names = [s[0] for s in steps]
    assert names == ["env", "tests", "memory", "bench-resnet18", "bench-wrn-34-10", "train", "aa-lite-fp32",
                     "aa-lite-amp", "autoattack"]
    for name, seconds, argv, _ in steps:
        assert f"  {name:<16}{seconds:>4} s" in out
        # one call, no exploration: every command is one the scripts accept
        if argv[1] == "at_alp.py":
            a = at_alp.get_args(argv[2:])
            assert (a.arch, a.alp, a.at, a.w_clean, a.w_adv, a.dataset) == ("resnet18", 0, 0, 0, 1, "folder")
        elif argv[1] == "evaluate.py":
            a = evaluate.get_args(argv[2:])
            assert a.preset == "standard" and a.n == 1000 and a.device == "cuda"
        elif argv[1:3] == ["-m", "tests.bench"]:
            assert bench.get_args(argv[3:]).archs == [name[len("bench-"):]]
    assert steps[6][2][2] == steps[7][2][2] == steps[8][2][steps[8][2].index("--checkpoint") + 1]  # one checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.UserError, match="needs a CUDA GPU"):
        gpu_check.main(["--out", "/nonexistent/g.json"])


def test_gpu_check_stops_a_slow_step_with_its_children_and_keeps_its_output(tmp_path):
    from tests import gpu_check
    child = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(child)!r}, 'w').write(str(c.pid)); print('half done', flush=True); time.sleep(60)")
    status, seconds, output = gpu_check.run_step([sys.executable, "-c", code], 3, str(tmp_path / "step.log"))
    assert status == "stopped at its 3 s limit" and seconds < 20 and "half done" in output
    pid = int(child.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)  # the step's own child went with it
    status, _, output = gpu_check.run_step([sys.executable, "-c", "print(7); raise SystemExit(3)"], 30,
                                           str(tmp_path / "b.log"))
    assert status == "failed (exit 3)" and output.strip() == "7"
    md = gpu_check.markdown({"gpu": "G", "torch": "t", "total_seconds": 12.0, "steps": [
        {"name": "train", "status": "ok", "seconds": 9.0, "figures": {"epoch 1": {"images_per_s": 1234.5}}}]})
    assert "| train | epoch 1 images_per_s | 1234 | ok | 9 |" in md


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
