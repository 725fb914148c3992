"""The GPU path (bf16 autocast, channels_last, uint8 data augmented on the device), exercised on the CPU.

`--amp --channels-last` makes common.Run take, on the CPU, exactly the code path it takes by default on
CUDA: torch.autocast(device.type, bfloat16), channels_last models and batches. The tests below train every
method that way for a couple of steps and compare with the float32 run from the same seed, check that the
losses that must stay in float32 under autocast do, and check the on-device data path on every device
this machine has.
"""
import functools
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import at_alp
import common
import defensive_distillation
import infoard
import ltd
from tests.util import DEVICE, TINY, tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_PATH = ["--amp", "--channels-last"]
FLOAT32 = ["--no-amp", "--no-channels-last"]  # the CPU default, spelled out (on CUDA the default is the GPU path)
# 96 synthetic training images - 32 held out = 2 steps of 32 per epoch (bf16 is emulated on most CPUs: slow).
SMALL = TINY + ["--epochs", "1", "--batch-size", "32", "--val-size", "32"]
METHODS = {
    "at_alp": (at_alp, []),
    "ltd": (ltd, ["--awp-warmup", "1"]),  # TRADES-AWP teacher, then the LTD student; AWP from the first step
    "infoard": (infoard, ["--teacher-arch", "wrn-10-1"]),  # PGD-AT teacher, then the student (all MIM terms)
    "defensive_distillation": (defensive_distillation, []),  # stage 1 at T=100, then the distilled model
}
# bf16 keeps 8 bits of mantissa: logits and activations carry ~0.4% relative error, and two steps of training
# with sign-gradient PGD (a flipped sign moves a pixel by 2 alpha) let the two runs drift a little more. Measured
# over seeds 0 and 1: at most 2.0% (InfoARD's 11-nat loss), under 1% for the others; half the tolerance.
LOSS_RTOL, LOSS_ATOL = 0.04, 0.02


@pytest.fixture(scope="module")
def small_synthetic():
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "synthetic_data", functools.partial(common.synthetic_data, n_train=96, n_test=64))
    yield
    mp.undo()


@pytest.fixture(scope="module", params=list(METHODS))
def trained_pair(request, small_synthetic, tmp_path_factory):
    """Train one method twice from seed 0: float32 NCHW (the CPU default) and the GPU path."""
    module, extra = METHODS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    paths = {mode: module.main(SMALL + extra + flags + ["--out-dir", str(out / mode)])
             for mode, flags in (("fp32", FLOAT32), ("gpu", GPU_PATH))}
    return request.param, out, paths


def _logs(run_dir):
    """{relative log path: [epoch losses]} for every stage of a run (two-stage methods log a teacher too)."""
    logs = {}
    for root, _, files in os.walk(run_dir):
        if "log.jsonl" in files:
            with open(os.path.join(root, "log.jsonl")) as f:
                logs[os.path.relpath(root, run_dir)] = [json.loads(line)["loss"] for line in f]
    return logs


def test_gpu_path_losses_are_finite_and_close_to_float32(trained_pair):
    method, out, _ = trained_pair
    fp32, gpu = _logs(out / "fp32"), _logs(out / "gpu")
    assert fp32.keys() == gpu.keys() and len(fp32) == (1 if method == "at_alp" else 2)
    for stage in fp32:
        for a, b in zip(fp32[stage], gpu[stage]):
            assert torch.isfinite(torch.tensor(b)), f"{method}/{stage}: loss {b}"
            assert b == pytest.approx(a, rel=LOSS_RTOL, abs=LOSS_ATOL), f"{method}/{stage}: fp32 {a} vs bf16 {b}"
    # ... and the GPU path really ran: bf16 rounding leaves the trained weights different from float32's.
    w32, wgpu = (common.load_checkpoint(p)["model"] for p in (trained_pair[2]["fp32"], trained_pair[2]["gpu"]))
    assert any(not torch.equal(w32[k], wgpu[k]) for k in w32 if w32[k].is_floating_point())


def test_gpu_path_writes_the_same_checkpoint_as_float32(trained_pair):
    method, out, paths = trained_pair
    for best in [(paths["fp32"], paths["gpu"])] + ([(out / "fp32/teacher/best.pt", out / "gpu/teacher/best.pt")]
                                                     if method != "at_alp" else []):
        a, b = (common.load_checkpoint(str(p)) for p in best)
        assert a.keys() == b.keys() and a["format"] == b["format"] == common.CHECKPOINT_FORMAT
        assert a["args"].keys() == b["args"].keys() and a["metrics"].keys() == b["metrics"].keys()
        assert (a["args"]["amp"], a["args"]["channels_last"], b["args"]["amp"], b["args"]["channels_last"]) == \
            (False, False, True, True)  # each checkpoint records the path it trained on
        assert a["model"].keys() == b["model"].keys()
        for k, v in b["model"].items():  # plain float32 NCHW tensors, whatever the training layout
            assert (v.dtype, v.shape) == (a["model"][k].dtype, a["model"][k].shape) and v.is_contiguous(), k
        model, _ = common.build_model_from_checkpoint(str(best[1]))
        assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()


# ------------------------------------------------------------------ Run: one switch each, any device
def test_amp_and_channels_last_are_device_agnostic_switches(tmp_path):
    parse = lambda extra: common.base_parser("t", epochs=1).parse_args(TINY + extra + ["--out-dir", str(tmp_path)])
    run = common.Run(parse(GPU_PATH), "t")
    x, _ = next(iter(run.train_loader))
    model = run.model()
    assert run.amp and run.channels_last and x.is_contiguous(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with run.autocast():
        assert model(x).dtype == torch.bfloat16  # bf16 autocast really runs on the CPU
    ck = common.make_checkpoint(model, run.args, run.info, "t", 0, {})
    teacher = common.load_teacher(_save(ck, tmp_path), run)
    assert teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the same decision, one place

    run32 = common.Run(parse([] if DEVICE == "cpu" else FLOAT32), "t")  # the CPU default stays float32 NCHW
    x32, _ = next(iter(run32.train_loader))
    model32 = run32.model()
    assert not run32.amp and not run32.channels_last and x32.is_contiguous()
    with run32.autocast():
        z32 = model32(x32)
    assert z32.dtype == torch.float32
    # Same seed, same numbers: the GPU path changes layout and rounding, nothing else (a layout mix-up would not
    # be close: it scrambles pixels and weights).
    assert torch.equal(x, x32)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model32.parameters()))
    model.load_state_dict(model32.state_dict())  # the same BatchNorm statistics too
    model.eval(), model32.eval()
    with torch.no_grad(), run.autocast():
        z = model(x)
    with torch.no_grad():
        z32 = model32(x32)
    scale = z32.abs().max().item()
    torch.testing.assert_close(z.float(), z32, rtol=0.02, atol=0.02 * scale)  # measured: ~0.6% of scale
    assert (z.float().argmax(1) == z32.argmax(1)).float().mean() > 0.8
    run = common.Run(parse(["--amp", "--no-channels-last"]), "t")  # and each switch alone
    assert run.amp and not run.channels_last and next(iter(run.train_loader))[0].is_contiguous()


def _save(ck, tmp_path):
    path = str(tmp_path / "t.pt")
    common.atomic_save(ck, path)
    return path


# ------------------------------------------------- losses that must be computed in float32 under autocast
TIGHT = dict(rtol=1e-5, atol=1e-6)  # ~400x finer than bf16's resolution (2^-8): any bf16 step would show


def _bf16_logits(seed, scale=3.0, shape=(16, 10)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


class Fixed(nn.Module):
    """A stand-in model with fixed bf16 logits (a network's output under autocast): `out`, or with `by_input`
    pairs (input, logits) the logits of whichever input it is given."""

    def __init__(self, out=None, by_input=()):
        super().__init__()
        self.out, self.by_input = out, by_input

    def forward(self, x):
        return next((z for inp, z in self.by_input if inp is x), self.out)


def test_ltd_temperatures_and_kl_are_float32_under_autocast():
    z_nat, z_adv, soft_logits = _bf16_logits(0), _bf16_logits(1), _bf16_logits(2)
    y, x, x_adv = torch.randint(10, (16,)), torch.zeros(16, 3, 4, 4), torch.ones(16, 3, 4, 4)
    tau_s, tau_t, beta = 3.0, 0.7, 6.0  # not powers of two: a bf16 division would round
    soft = F.softmax(soft_logits.double() / tau_t, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_t = ltd.teacher_soft_labels(Fixed(soft_logits).eval(), x, tau_t)
        loss, z = ltd.ltd_loss(Fixed(by_input=[(x, z_nat), (x_adv, z_adv)]), x, x_adv, y, beta, tau_s, p_t)
    assert p_t.dtype == loss.dtype == z.dtype == torch.float32
    torch.testing.assert_close(p_t.double(), soft, **TIGHT)
    zn, za = z_nat.double() / tau_s, z_adv.double() / tau_s
    lp_nat, lp_adv = F.log_softmax(zn, 1), F.log_softmax(za, 1)
    ref = -(soft * lp_nat).sum(1).mean() + beta * (lp_nat.exp() * (lp_nat - lp_adv)).sum(1).mean()
    torch.testing.assert_close(loss.double(), ref, **TIGHT)


def test_defensive_distillation_temperature_losses_are_float32_under_autocast():
    big = _bf16_logits(3, scale=300.0)  # F_d-size logits: bf16 spaces them 2 apart
    y, x = torch.randint(10, (16,)), torch.rand(16, 3, 32, 32)
    T = 100.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, _ = defensive_distillation.temperature_ce_loss(Fixed(big), x, y, T)
        soft = F.softmax(_bf16_logits(4, 2.0).float(), 1)
        kd, _ = defensive_distillation.distillation_loss(Fixed(big), x, soft, T)
        teacher = tiny_model().eval()
        p = defensive_distillation.soft_labels(teacher, x, T)
        p_autocast = F.softmax(teacher(x).float() / T, 1)  # what the teacher forward gives inside autocast
    assert ce.dtype == kd.dtype == p.dtype == torch.float32
    torch.testing.assert_close(ce.double(), F.cross_entropy(big.double() / T, y), **TIGHT)
    torch.testing.assert_close(kd.double(), -(soft.double() * F.log_softmax(big.double() / T, 1)).sum(1).mean(), **TIGHT)
    with torch.no_grad():
        p_fp32 = F.softmax(teacher(x) / T, 1)  # the teacher itself in float32: autocast is off inside soft_labels
    torch.testing.assert_close(p, p_fp32, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(p_autocast, p_fp32, rtol=1e-6, atol=1e-7)  # (a bf16 teacher forward would differ)


def test_infoard_kl_and_infonce_are_float32_under_autocast():
    t, s_adv, s_nat = _bf16_logits(5), _bf16_logits(6), _bf16_logits(7)
    za, zb = (F.normalize(_bf16_logits(s, 1.0, (16, 32)).float(), dim=1).bfloat16() for s in (8, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = infoard.rslad_kl(t, s_adv, s_nat)
        nce = infoard.info_nce(za, zb, tau=0.07)
    assert kl.dtype == nce.dtype == torch.float32
    kl_ref = lambda p, q: (F.softmax(p, 1) * (F.log_softmax(p, 1) - F.log_softmax(q, 1))).sum(1).mean()
    t64, a64, n64 = t.double(), s_adv.double(), s_nat.double()
    torch.testing.assert_close(kl.double(), 5 / 6 * kl_ref(t64, a64) + 1 / 6 * kl_ref(t64, n64), **TIGHT)
    sim = za.double() @ zb.double().t() / 0.07
    labels = torch.arange(16)
    nce_ref = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels))
    torch.testing.assert_close(nce.double(), nce_ref, **TIGHT)


class Recorder(nn.Module):
    """Wraps a model; records, at every forward, whether autocast was on (and for which output dtype)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.autocast_on = model, []

    def forward(self, x, **kw):
        self.autocast_on.append(torch.is_autocast_enabled(x.device.type))
        return self.model(x, **kw)


def test_ltd_and_infoard_teachers_run_in_float32_under_autocast():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    teacher, student = Recorder(tiny_model(0)).eval(), Recorder(tiny_model(1))
    with torch.no_grad():
        p_fp32 = F.softmax(teacher.model(x) / 0.5, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_t = ltd.teacher_soft_labels(teacher, x, 0.5)
        heads = infoard.ProjectionHeads(64, 64)
        infoard.infoard_loss(student, teacher, heads, x, y, steps=2, asa="off", inner="adaad", w_at=1.0)
    torch.testing.assert_close(p_t, p_fp32, rtol=1e-5, atol=1e-6)  # a bf16 teacher would be ~1e-2 off at tau 0.5
    assert len(teacher.autocast_on) > 3 and not any(teacher.autocast_on)  # soft labels, features, every adaad step
    assert any(student.autocast_on)  # ... while the student itself did run under autocast


def test_at_alp_pairing_losses_are_float32_under_autocast():
    torch.manual_seed(0)
    model = tiny_model().train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = at_alp.at_alp_loss(model, x, y, 8 / 255, 2 / 255, 1)
        maps = [torch.randn(8, 4, 6, 6).bfloat16(), torch.randn(8, 4, 6, 6).bfloat16()]
        pair = at_alp.attention_pairing_loss(maps[:1], maps[1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == pair.dtype == torch.float32
    a, b = (F.normalize(m.double().pow(2).mean(1).flatten(1), dim=1) for m in maps)
    torch.testing.assert_close(pair.double(), (a - b).pow(2).mean(), **TIGHT)


# ------------------------------------------------------------------------- the on-device data path
def _locate(img, src, pad=4):
    """(row offset, col offset, flipped) of every way `img` is a crop (+ flip) of zero-padded `src`."""
    h, w = src.shape[-2:]
    xp = F.pad(src, (pad,) * 4)
    return [(a, b, f) for a in range(2 * pad + 1) for b in range(2 * pad + 1) for f in (False, True)
            if torch.equal(xp[:, a:a + h, b:b + w].flip(2) if f else xp[:, a:a + h, b:b + w], img)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_on_device_loader_stores_uint8_and_crops_and_flips_each_sample(device, channels_last):
    torch.manual_seed(0)
    x = torch.randint(1, 255, (64, 3, 12, 12), dtype=torch.uint8)  # no zeros: padding shows in a crop
    loader = common.TensorLoader(x, torch.arange(64), 32, device, train=True, channels_last=channels_last)
    assert loader.x.dtype == torch.uint8 and loader.x.device.type == device  # 1 byte per pixel on the device
    found = []
    for xb, ids in loader:
        assert xb.device.type == device and xb.dtype == torch.float32 and 0 <= xb.min() <= xb.max() <= 1
        assert xb.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for img, i in zip(xb.cpu(), ids.cpu()):
            where = _locate((img * 255).round().to(torch.uint8), x[i])
            assert len(where) == 1, f"sample {i}: not one crop/flip of its source image"
            found.append(where[0])
    assert len(found) == 64
    assert len({(a, b) for a, b, _ in found[:32]}) > 10  # offsets drawn per sample, not per batch
    assert 0.2 < sum(f for *_, f in found) / 64 < 0.8  # flipped per sample


@pytest.mark.parametrize("device", DEVICES)
def test_on_device_shards_are_disjoint_and_cover_the_data(device):
    x = torch.zeros(100, 1, 4, 4, dtype=torch.uint8)
    for train, epochs in ((True, 2), (False, 1)):
        for epoch in range(epochs):
            shards = []
            for rank in range(2):
                loader = common.TensorLoader(x, torch.arange(100), 10, device, train=train, rank=rank, world=2)
                loader.set_epoch(epoch)
                shards.append(torch.cat([ids for _, ids in loader]).cpu().tolist())
            assert not set(shards[0]) & set(shards[1])
            assert sorted(shards[0] + shards[1]) == list(range(100))
            assert len(shards[0]) == len(shards[1]) == 50
