"""evaluate.py tests: attacks against closed-form optima, worst-case accounting, masking diagnostics, end to end."""
import contextlib
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluate
from tests.util import TINY, pgd_at, train_small_cnn

NO_AMP = contextlib.nullcontext


# ------------------------------------------------------------------ closed form on a linear model
@pytest.fixture(scope="module")
def linear_problem():
    """A linear classifier where only classes 0 and 1 compete (the others have a -1000 bias).

    For a two-class linear decision the best L-inf attack inside the eps ball and the [0,1] box is known
    exactly: move every pixel to whichever end of its allowed interval raises w_other - w_y."""
    torch.manual_seed(0)
    d = 3 * 4 * 4
    lin = nn.Linear(d, 10)
    with torch.no_grad():
        lin.weight.normal_(0, 1)
        lin.bias.zero_()
        lin.bias[2:] = -1000
    model = nn.Sequential(nn.Flatten(), lin).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(200, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # all points start correctly classified
    eps = 0.05
    w = lin.weight
    other = 1 - y
    dw = (w[other] - w[y]).view(-1, 3, 4, 4)  # gradient of the margin z_other - z_y
    lo, hi = torch.clamp(-x, min=-eps), torch.clamp(1 - x, max=eps)
    best_delta = torch.where(dw > 0, hi, lo)
    with torch.no_grad():
        z = model(x)
        margin0 = z.gather(1, other[:, None]).squeeze(1) - z.gather(1, y[:, None]).squeeze(1)
    best_margin = margin0 + (dw * best_delta).flatten(1).sum(1)
    keep = best_margin.abs() > 1e-3  # leave out points within float error of the boundary
    return model, x[keep], y[keep], eps, best_margin[keep]


def test_closed_form_setup_is_nontrivial(linear_problem):
    *_, best = linear_problem
    breakable = (best > 0).float().mean()
    assert 0.2 < breakable < 0.8


@pytest.mark.parametrize("attack", ["pgd-ce", "pgd-cw", "apgd-ce", "apgd-t"])
def test_attacks_match_the_closed_form_optimum(linear_problem, attack):
    model, x, y, eps, best = linear_problem
    if attack == "pgd-ce":
        adv = common.pgd(model, x, y, eps, eps / 4, 20)
    elif attack == "pgd-cw":
        adv = common.pgd(model, x, y, eps, eps / 4, 20, loss="cw")
    elif attack == "apgd-ce":
        adv = evaluate.apgd(model, x, y, eps, 50, "ce")
    else:
        adv = evaluate.apgd_targeted(model, x, y, eps, 50, n_targets=9)
    assert ((adv - x).abs() <= eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        broken = model(adv).argmax(1) != y
    assert torch.equal(broken, best > 0)  # breaks exactly the points the closed form can break
    if attack == "pgd-cw":  # and reaches the optimal margin itself
        with torch.no_grad():
            z = model(adv)
        margin = z.gather(1, (1 - y)[:, None]).squeeze(1) - z.gather(1, y[:, None]).squeeze(1)
        assert torch.allclose(margin, best, atol=1e-4)


def test_apgd_and_square_respect_eps_ball_and_box():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    x = torch.rand(16, 3, 32, 32)
    x[:4] = 0.0  # corners of the box
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    eps = 8 / 255
    for adv in (evaluate.apgd(net, x, y, eps, 10, "ce"), evaluate.apgd(net, x, y, eps, 10, "dlr"),
                evaluate.apgd_targeted(net, x, y, eps, 5, n_targets=2), evaluate.square_attack(net, x, y, eps, 50)):
        assert ((adv - x).abs() <= eps + 1e-6).all()
        assert adv.min() >= 0 and adv.max() <= 1


def test_square_handles_non_square_images():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 64, 10))
    x = torch.rand(4, 3, 16, 64)
    adv = evaluate.square_attack(net, x, torch.zeros(4, dtype=torch.long), 8 / 255, 30)
    assert adv.shape == x.shape and ((adv - x).abs() <= 8 / 255 + 1e-6).all()


def test_apgd_beats_random_noise_on_a_real_net():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    x = torch.rand(32, 3, 32, 32)
    with torch.no_grad():
        y = net(x).argmax(1)
    adv = evaluate.apgd(net, x, y, 4 / 255, 20, "ce")
    with torch.no_grad():
        ce_adv = F.cross_entropy(net(adv), y, reduction="none")
        ce_noise = F.cross_entropy(net((x + (torch.rand_like(x) * 2 - 1) * 4 / 255).clamp(0, 1)), y, reduction="none")
    assert (ce_adv > ce_noise).float().mean() > 0.9


# -------------------------------------------------------------------------- worst-case accounting
def test_an_image_broken_by_any_attack_counts_as_broken():
    # A "model" that reads the class from the first pixel; fake attacks that break chosen images.
    model = lambda x: F.one_hot((x[:, 0, 0, 0] * 10).long().clamp(0, 9), 10).float()
    y = torch.arange(8) % 10
    x = torch.zeros(8, 1, 2, 2)
    x[:, 0, 0, 0] = (y.float() + 0.5) / 10
    breaks = {"a": {1, 2}, "b": {2, 5}, "c": set()}  # image ids each attack can break

    def attack(name, xa, ya):
        out = xa.clone()
        for i in range(len(ya)):
            if int(ya[i]) in breaks[name]:
                out[i, 0, 0, 0] = ((ya[i] + 1) % 10 + 0.5) / 10 - 1e-3
        return out
    seconds = {k: 0.0 for k in ("clean", "a", "b", "c")}
    masks, x_show = evaluate.cascade(model, x, y, ["a", "b", "c"], attack, eps=1.0, autocast=NO_AMP, seconds=seconds)
    assert masks["clean"].all()
    assert (~masks["a"]).nonzero().squeeze(1).tolist() == [1, 2]
    assert (~masks["b"]).nonzero().squeeze(1).tolist() == [1, 2, 5]  # union, never "un-broken"
    assert (~masks["c"]).nonzero().squeeze(1).tolist() == [1, 2, 5]
    assert (model(x_show).argmax(1) != y).nonzero().squeeze(1).tolist() == [1, 2, 5]


# -------------------------------------------------------------------------------- masking checks
@pytest.fixture(scope="module")
def small_net_and_data():
    net, xt, yt = train_small_cnn()
    xt, yt = xt[:64], yt[:64]
    keep = net(xt).argmax(1) == yt
    return net, xt[keep], yt[keep]


class Scaled(nn.Module):
    def __init__(self, net, scale):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net(x) * self.scale


def test_masking_diagnostics_flag_saturated_logits_and_not_the_plain_model(small_net_and_data):
    net, x, y = small_net_and_data
    assert len(y) > 30
    plain = evaluate.diagnose(net, x, y, 16 / 255, 4 / 255, 10, NO_AMP, square_queries=200)
    scaled = evaluate.diagnose(Scaled(net, 1000.0), x, y, 16 / 255, 4 / 255, 10, NO_AMP, square_queries=200)
    assert not plain["masking_suspected"], plain["reasons"]
    assert plain["verdict"] == "no sign of gradient masking"
    assert scaled["masking_suspected"] and scaled["verdict"].startswith("gradient masking suspected")
    # The CE-vs-margin test is what flags it: the margin attack is scale-free, the CE one is blinded.
    assert any(r.startswith("CE-vs-margin") and "overstates robustness" in r for r in scaled["reasons"])
    t = scaled["ce_vs_margin"]
    assert t["R"] > 10 and t["b"] / t["R"] > 0.8 and t["p"] < 0.01 and plain["ce_vs_margin"]["p"] > 0.01
    assert scaled["acc_pgd20_ce"] - scaled["acc_pgd20_cw"] > 0.5
    assert scaled["acc_pgd20_cw"] == pytest.approx(plain["acc_pgd20_cw"], abs=0.1)
    assert scaled["zero_grad_share"] > 0.5 and plain["zero_grad_share"] == 0
    assert scaled["zero_grad_images"] == round(scaled["zero_grad_share"] * scaled["n_correct"])
    assert plain["zero_grad_images"] == 0
    assert scaled["mean_abs_logit"] > 100 * plain["mean_abs_logit"] * 0.99


def test_diagnostics_print_every_accuracy_with_its_interval(small_net_and_data, capsys):
    net, x, y = small_net_and_data
    d = evaluate.diagnose(Scaled(net, 1000.0), x[:24], y[:24], 16 / 255, 4 / 255, 10, NO_AMP, square_queries=50)
    evaluate.print_diagnostics(d, 50)
    out = capsys.readouterr().out
    assert d["judged"] and d["n"] == 24 and d["counts"]["clean"] == 24
    for k, v in d["counts"].items():
        assert d["ci95"][k] == list(evaluate.wilson_interval(v, 24)) and evaluate.format_accuracy(v, 24) in out
    for v in d["eps_sweep_counts"].values():
        assert evaluate.format_accuracy(v, 24) in out
    t = d["ce_vs_margin"]
    assert set(t) == {"R", "b", "share", "q0", "p"} and t["q0"] == evaluate.Q0_CE_MARGIN
    assert f"breaks {t['b']} of the {t['R']} images CE leaves robust" in out
    assert f"zero input gradient, of the 24 correctly classified: CE {d['zero_grad_images']}/24" in out
    assert d["zero_grad_images"] > 12
    assert out.splitlines()[-1] == "verdict: " + d["verdict"] and d["verdict"].startswith("gradient masking suspected")


class PixelLogits(torch.nn.Module):
    """Logits = 10 x the first 10 pixels: the image decides the class ranking."""

    def forward(self, x):
        return 10 * x.flatten(1)[:, :10]


def test_zero_dlr_gradient_of_misclassified_images_is_not_masking():
    # 30 images classified correctly, 10 misclassified with their true class ranked third: their DLR is
    # exactly 1 (numerator = denominator), so its input gradient is exactly zero, though nothing is masked.
    x, y = torch.full((40, 16), 0.1), torch.arange(40) % 10
    for i in range(40):
        if i < 30:
            x[i, y[i]] = 0.9
        else:
            x[i, (y[i] + 1) % 10], x[i, (y[i] + 2) % 10], x[i, y[i]] = 0.9, 0.6, 0.4
    x = x.view(40, 1, 4, 4)
    net = PixelLogits()
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(evaluate.dlr_loss(net(xg), y).sum(), xg)
    assert (g.flatten(1).abs().amax(1) == 0).tolist() == [False] * 30 + [True] * 10  # the trap is real
    d = evaluate.diagnose(net, x, y, 16 / 255, 4 / 255, 10, NO_AMP, square_queries=20)
    assert d["judged"] and d["n_correct"] == 30 and d["zero_grad_images_dlr"] == 0 and d["zero_grad_share_dlr"] == 0
    assert not any("zero input gradient" in r for r in d["reasons"]), d["reasons"]


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return pgd_at(TINY + ["--out-dir", str(out)])


def test_end_to_end_quick_report_has_every_field(checkpoint, tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "g.png"
    report = evaluate.main([checkpoint, "--preset", "quick", "--n", "48", "--batch-size", "24", "--device", "cpu",
                            "--json", str(js), "--examples", str(png), "--quiet"])
    saved = json.loads(js.read_text())
    for key in ("checkpoint", "method", "arch", "dataset", "temperature", "epoch", "n", "eps", "alpha",
                "attack_settings", "device", "clean_acc", "attacks", "robust_acc", "seconds", "clean_count",
                "clean_ci95", "robust_count", "robust_ci95"):
        assert key in saved, key
    # every accuracy, printed and in the JSON, with its count and 95% interval
    out = capsys.readouterr().out
    assert saved["clean_acc"] == saved["clean_count"] / 48 and saved["protocol"] == "quick: pgd20, cw"
    assert saved["clean_ci95"] == list(evaluate.wilson_interval(saved["clean_count"], 48))
    assert evaluate.format_accuracy(saved["clean_count"], 48) in out
    for a in saved["attacks"]:
        assert a["acc_after"] == a["count_after"] / 48 and a["ci95_after"] == list(evaluate.wilson_interval(a["count_after"], 48))
        assert evaluate.format_accuracy(a["count_after"], 48) in out
    assert saved["robust_count"] == saved["attacks"][-1]["count_after"]
    assert evaluate.format_accuracy(saved["robust_count"], 48) in out.splitlines()[-1]
    assert saved["n"] == 48 and saved["method"] == "pgd-at" and saved["dataset"] == "synthetic"
    assert [a["name"] for a in saved["attacks"]] == ["pgd20", "cw"]
    accs = [saved["clean_acc"]] + [a["acc_after"] for a in saved["attacks"]]
    assert accs == sorted(accs, reverse=True)  # worst case can only go down
    assert saved["robust_acc"] == accs[-1] == report["robust_acc"]
    assert saved["eps"] == pytest.approx(8 / 255)
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] == 8 * 96


def test_end_to_end_errors_are_clear(checkpoint, tmp_path):
    with pytest.raises(common.UserError, match="checkpoint not found"):
        evaluate.main([str(tmp_path / "nope.pt")])
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(common.UserError, match="corrupt.pt is not a robust-distill checkpoint"):
        evaluate.main([str(tmp_path / "corrupt.pt")])
    from PIL import Image
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "tree" / split / c)
            Image.new("RGB", (16, 16)).save(tmp_path / "tree" / split / c / "0.png")
    with pytest.raises(common.UserError, match="dataset mismatch: checkpoint expects 10 classes"):
        evaluate.main([checkpoint, "--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--device", "cpu"])
    twice = evaluate.main([checkpoint, "--attacks", "fgsm,fgsm", "--n", "32", "--device", "cpu", "--json", str(tmp_path / "t.json")])
    assert [a["name"] for a in twice["attacks"]] == ["fgsm"] and twice["robust_acc"] <= twice["clean_acc"]
    with pytest.raises(common.UserError, match="unknown attack 'pgd7'"):
        evaluate.main([checkpoint, "--attacks", "pgd7", "--device", "cpu"])
    with pytest.raises(common.UserError, match="needs --transfer-from"):
        evaluate.main([checkpoint, "--attacks", "transfer", "--device", "cpu"])


def test_report_is_on_disk_before_the_diagnostics_and_written_atomically(checkpoint, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the diagnostics
    monkeypatch.setattr(evaluate, "diagnose", interrupted)
    path = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([checkpoint, "--attacks", "fgsm", "--n", "16", "--device", "cpu", "--quiet", "--diagnose",
                       "--json", str(path)])
    saved = json.loads(path.read_text())  # the cascade survived
    assert saved["n"] == 16 and "robust_acc" in saved and "diagnostics" not in saved
    assert os.listdir(tmp_path) == ["r.json"]  # no temp file left behind
    real_dump = json.dump

    def dump_then_fail(obj, f, **kw):
        real_dump({"half": 1}, f)
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", dump_then_fail)
    with pytest.raises(OSError):
        evaluate.write_report(str(path), {"n": 1})
    assert json.loads(path.read_text())["n"] == 16 and os.listdir(tmp_path) == ["r.json"]  # the old one intact


def test_missing_official_autoattack_is_a_clear_error(checkpoint, monkeypatch):
    monkeypatch.setattr(evaluate, "official_autoattack", lambda: None)
    with pytest.raises(common.UserError, match="needs the official package installed"):
        evaluate.main([checkpoint, "--attacks", "autoattack", "--device", "cpu"])


# ------------------------------------------------------------- precision: decisions in float32
BF16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)


class AutocastLies(nn.Module):
    """A 5-class model on 1x2x2 images (all 0.5) whose forward under autocast adds 0.1 to class 1's logit: a
    stand-in for a bf16 rounding error on near-tied logits. In float32 class 1 can never win inside eps 0.1
    (z1 <= 0.94 < z0 = 1), under autocast it can (1.04). Class 2 (ranked last) wins in float32 only in a small
    corner of the eps ball (pixels 2 and 3 both near +eps), which a random start almost never hits but its
    own targeted attack finds. Classes 3 and 4 are constants that keep z2 out of the other targets' DLR."""

    def forward(self, x):
        p = x.flatten(1)
        z1 = 0.9 + 0.2 * (p[:, 0] + p[:, 1] - 1)
        s = p[:, 2] + p[:, 3]
        z2 = 0.85 + 0.05 * (s - 1) + 10 * F.relu(s - 1.18)
        c = torch.full_like(z1, 0.89)
        z = torch.stack([torch.ones_like(z1), z1, z2, c, c], 1)
        if torch.is_autocast_enabled(x.device.type):
            z = z + torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0])
        return z


def test_apgd_t_decides_target_hits_with_the_float32_verdict():
    torch.manual_seed(0)
    model, eps = AutocastLies(), 0.1
    x, y = torch.full((4, 1, 2, 2), 0.5), torch.zeros(4, dtype=torch.long)
    # The trap: APGD towards target 1 gives points that the autocast forward calls broken and float32 does not.
    # The old code decided "hit" on that autocast forward, stopped trying targets, and the float32 verdict
    # then counted the image robust.
    order = evaluate.predict_logits(model, x).scatter(1, y[:, None], float("inf")).argsort(1, descending=True)
    assert (order[:, 1] == 1).all() and (order[:, 4] == 2).all()
    with BF16():
        adv1 = evaluate.apgd(model, x, y, eps, 20, "dlr-t", target=order[:, 1])
        assert (model(adv1).argmax(1) != y).all()  # "broken" in the autocast forward ...
    assert (evaluate.predict(model, adv1) == y).all()  # ... but not in float32
    # Now: the float32 verdict says target 1 failed, so targets 3, 4 and then 2 are tried; 2 breaks them for real.
    attack = lambda name, xa, ya: evaluate.run_attack(name, model, xa, ya, eps, eps / 4, apgd_iters=20)
    seconds = {"clean": 0.0, "apgd-t": 0.0}
    masks, x_show = evaluate.cascade(model, x, y, ["apgd-t"], attack, eps, BF16, seconds)
    assert masks["clean"].all() and not masks["apgd-t"].any()
    assert (evaluate.predict(model, x_show) == 2).all()


def test_apgd_under_autocast_never_keeps_a_point_float32_calls_robust():
    torch.manual_seed(0)
    model, x, y = AutocastLies(), torch.full((4, 1, 2, 2), 0.5), torch.zeros(4, dtype=torch.long)
    with BF16():  # eps 0.05: class 2 cannot win, class 1 "wins" only through the autocast lie
        adv = evaluate.apgd(model, x, y, 0.05, 20, "ce")
    assert (evaluate.predict(model, adv) == y).all()
    sq = evaluate.square_attack(model, x, y, 0.05, 100)  # Square's margins are float32 as well
    with BF16():
        assert (evaluate.predict(model, sq) == y).all()


def test_every_attack_under_bf16_autocast_breaks_only_what_the_verdict_confirms(small_net_and_data):
    net, x, y = small_net_and_data
    x, y = x[:12], y[:12]
    names = ["fgsm", "pgd20", "cw", "apgd-ce", "apgd-t", "square"]
    attack = lambda name, xa, ya: evaluate.run_attack(name, net, xa, ya, 4 / 255, 1 / 255, apgd_iters=5,
                                                      square_queries=30)
    seconds = {k: 0.0 for k in ["clean"] + names}
    torch.manual_seed(0)
    masks, x_show = evaluate.cascade(net, x, y, names, attack, 4 / 255, BF16, seconds)
    verdict_ok = evaluate.predict(net, x_show) == y
    assert torch.equal(verdict_ok, masks[names[-1]])  # broken <=> misclassified in float32, image by image
    assert masks["clean"].sum() > masks[names[-1]].sum()  # and the attacks did break something


class Recorder(nn.Module):
    """Linear 2-class model that records every input it sees with gradients on (APGD's iterates)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        z = torch.stack([torch.full_like(x[:, 0, 0, 0], 0.1), 5 * (x - 0.5).flatten(1).sum(1)], 1)
        if x.requires_grad:
            self.seen.append((x.detach().clone(), z.detach().argmax(1)))
        return z


def test_apgd_returns_the_last_misclassified_iterate():
    torch.manual_seed(3)
    model, x, y = Recorder(), torch.full((6, 1, 2, 2), 0.5), torch.zeros(6, dtype=torch.long)
    adv = evaluate.apgd(model, x, y, 0.1, 30, "ce")
    assert len(model.seen) == 31  # the start and 30 iterations
    moved = 0
    for i in range(len(x)):
        wrong = [z[i] for z, pred in model.seen if pred[i] != y[i]]
        assert len(wrong) > 1
        assert torch.equal(adv[i], wrong[-1])
        moved += not torch.equal(wrong[0], wrong[-1])
    assert moved > 0  # the first misclassified iterate (the old answer) is a different point


def test_square_schedule_is_autoattacks_for_5000_queries_on_32px():
    # AutoAttack, resc_schedule=False: p = 0.8 halves after queries 10, 50, 200, 500, 1k, 2k, 4k (6k, 8k not reached
    # in 5,000), side = round(sqrt(p * 32 * 32)).
    table = {0: 29, 10: 29, 11: 20, 50: 20, 51: 14, 200: 14, 201: 10, 500: 10, 501: 7, 1000: 7, 1001: 5,
             2000: 5, 2001: 4, 4000: 4, 4001: 3, 4999: 3}
    assert {i: evaluate.square_size(i, 32, 32) for i in table} == table


def test_square_counts_queries_as_autoattack_does():
    calls = []

    def model(z):  # never fooled: Square runs its whole budget
        calls.append(len(z))
        return torch.tensor([[5.0, 0.0]]).expand(len(z), 2)
    evaluate.square_attack(model, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), 0.1, n_queries=40)
    assert len(calls) == 41 and sum(calls) == 2 * 41  # one initial query + 40 iterations, per image


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                    reason="PyTorch < 2.9: no fp32_precision API")
def test_evaluation_runs_in_strict_float32_with_the_new_api_and_restores_it(monkeypatch):
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda args: seen.update(
        conv=cudnn.conv.fp32_precision, matmul=matmul.fp32_precision, benchmark=cudnn.benchmark))
    before = cudnn.conv.fp32_precision, matmul.fp32_precision, cudnn.benchmark
    # A notebook or library that used the new API: reading the legacy allow_tf32 flags would now raise.
    cudnn.conv.fp32_precision = matmul.fp32_precision = "tf32"
    cudnn.benchmark = True  # as a training run in the same process leaves it
    try:
        evaluate.main(["x.pt"])
        assert seen == {"conv": "ieee", "matmul": "ieee", "benchmark": False}
        assert (cudnn.conv.fp32_precision, matmul.fp32_precision, cudnn.benchmark) == ("tf32", "tf32", True)
    finally:
        cudnn.conv.fp32_precision, matmul.fp32_precision, cudnn.benchmark = before


def test_evaluation_runs_with_legacy_tf32_flags_off_and_restores_them(monkeypatch):
    monkeypatch.setattr(type(torch.backends.cudnn), "conv", None, raising=False)  # as PyTorch < 2.9
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda args: seen.update(
        cudnn=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32,
        benchmark=torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = True
    try:
        evaluate.main(["x.pt"])
        assert seen == {"cudnn": False, "matmul": False, "benchmark": False}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = before


# ----------------------------------------------------------------- what was run, and progress
def test_report_names_protocol_and_precision(checkpoint, tmp_path):
    common_args = [checkpoint, "--preset", "standard", "--n", "16", "--apgd-iters", "3", "--device", "cpu", "--quiet"]
    fp32 = evaluate.main(common_args + ["--json", str(tmp_path / "a.json")])
    assert fp32["protocol"] == "custom: apgd-ce, apgd-t (apgd_iters=3)"  # not AutoAttack's budget: not "AA-lite"
    assert fp32["precision"] == "float32" and fp32["skipped"] == {}
    assert fp32["attack_settings"]["apgd_t_targets"] == 9
    bf16 = evaluate.main(common_args + ["--amp", "--json", str(tmp_path / "b.json")])
    assert bf16["precision"].startswith("bf16") and "decision in float32" in bf16["precision"]
    assert json.loads((tmp_path / "b.json").read_text())["protocol"] == fp32["protocol"]


def test_protocol_label_names_presets_only_at_their_default_budgets():
    label = evaluate.protocol_label
    assert label(["apgd-ce", "apgd-t"], 10) == "AA-lite: apgd-ce, apgd-t (9 targets; no FAB-T, no Square)"
    assert label(["apgd-ce", "apgd-t", "square"], 10, square_queries=500) == \
        "custom: apgd-ce, apgd-t, square (square_queries=500)"
    assert label(["apgd-ce", "apgd-t"], 10, square_queries=500).startswith("AA-lite")  # Square did not run
    assert label(["pgd20", "cw"], 10) == "quick: pgd20, cw"
    assert label(["pgd20", "cw"], 10, pgd_step=0.01) == "custom: pgd20, cw (pgd_step=0.01)"
    assert label(["autoattack"], 5) == "AutoAttack, official package, version standard (4 targets)"
    assert label(["fgsm"], 10) == "custom: fgsm"


def test_few_classes_skip_apgd_t_and_diagnostics_sample_across_classes(tmp_path, monkeypatch, capsys):
    import argparse
    import types
    import numpy as np
    from PIL import Image
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for ci, c in enumerate("abc"):  # stored class by class, as folder trees are
            os.makedirs(tree / split / c)
            for i in range(6):
                Image.fromarray(np.full((8, 8, 3), 60 * ci + 7 * i, np.uint8)).save(tree / split / c / f"{i}.png")
    torch.manual_seed(0)
    model = common.build_model("wrn-10-1", 3, 3, 8)
    path = str(tmp_path / "m.pt")
    torch.save(common.make_checkpoint(model, argparse.Namespace(arch="wrn-10-1", dataset="folder", data_dir=str(tree)),
                                      types.SimpleNamespace(num_classes=3, channels=3, size=8), "test", 0, {}), path)
    seen = []
    real = evaluate.diagnose
    monkeypatch.setattr(evaluate, "diagnose", lambda m, x, y, *a, **k: seen.append(y.tolist()) or real(m, x, y, *a, **k))
    report = evaluate.main([path, "--preset", "standard", "--apgd-iters", "3", "--diagnose", "--diagnose-n", "6",
                            "--device", "cpu", "--quiet", "--json", str(tmp_path / "r.json")])
    assert [a["name"] for a in report["attacks"]] == ["apgd-ce"]
    assert "apgd-t" in report["skipped"] and "4+ classes" in report["skipped"]["apgd-t"]
    assert report["protocol"].startswith("custom: apgd-ce (apgd_iters=3)") and "apgd-t skipped" in report["protocol"]
    assert report["attack_settings"]["apgd_t_targets"] == 2
    assert len(seen[0]) == 6 and len(set(seen[0])) > 1  # not the first 6 images, which are all class "a"
    assert "apgd-t skipped" in capsys.readouterr().out.splitlines()[-1]


def test_cascade_hints_and_square_warning():
    names = ["apgd-ce", "apgd-t", "square"]
    # APGD-T breaks 50 of the 250 images APGD-CE left (20%): an honest model's few percent, not above 25%
    assert evaluate.cascade_warnings(names, {"apgd-ce": 250, "apgd-t": 200, "square": 199}, 1000) == []
    # 40 of 100 (40%): more than a quarter at 99% confidence; Square then removes 3 more of 1000 (0.3 points)
    out = evaluate.cascade_warnings(names, {"apgd-ce": 100, "apgd-t": 60, "square": 57}, 1000)
    assert len(out) == 2 and out[0].startswith("hint: APGD-T") and out[1].startswith("warning: the black-box Square")
    assert "breaks 40 of the 100 images" in out[0]
    # one 2-point drop (20 of 1000 images): a hint when APGD-CE left 30, silence when it left 600 (scale-free)
    assert evaluate.cascade_warnings(names[:2], {"apgd-ce": 30, "apgd-t": 10}, 1000)
    assert not evaluate.cascade_warnings(names[:2], {"apgd-ce": 600, "apgd-t": 580}, 1000)
    t = evaluate.apgd_t_test(names, {"apgd-ce": 100, "apgd-t": 60, "square": 57})
    assert (t["R"], t["b"], t["share"], t["q0"]) == (100, 40, 0.4, 0.25)
    assert t["p"] == pytest.approx(evaluate.binom_tail(40, 100, 0.25)) and t["p"] < 0.01
    assert evaluate.apgd_t_test(["apgd-t", "apgd-ce"], {"apgd-ce": 1, "apgd-t": 1}) is None


def test_progress_line_on_a_non_tty_run_and_quiet_silences_it(checkpoint, tmp_path, monkeypatch, capsys):
    import time as _time
    monkeypatch.setattr(common, "PROGRESS_EVERY", 0.02)
    slow = evaluate.run_attack
    monkeypatch.setattr(evaluate, "run_attack", lambda *a, **k: _time.sleep(0.1) or slow(*a, **k))
    args = [checkpoint, "--attacks", "fgsm", "--n", "48", "--batch-size", "16", "--device", "cpu",
            "--json", str(tmp_path / "p.json")]
    evaluate.main(args)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("evaluating:")]
    assert lines and all("/48 images" in l and "images/s" in l and "eta" in l for l in lines)
    assert any("[batch" in l and "fgsm" in l for l in lines)
    evaluate.main(args + ["--quiet"])
    assert "evaluating:" not in capsys.readouterr().out


def test_training_shows_progress_inside_an_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "PROGRESS_EVERY", 0.01)
    pgd_at(TINY + ["--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "  epoch 1: " in out and "images/s" in out
    assert "[pgd-at] epoch 1/1" in out  # the per-epoch line stays as it was


def test_bad_counts_are_one_line_errors(checkpoint):
    for flag, value in (("--n", "0"), ("--n", "-5"), ("--diagnose-n", "0"), ("--batch-size", "0"), ("--apgd-iters", "0"),
                        ("--transfer-steps", "0"), ("--eps", "-0.1")):
        with pytest.raises(common.UserError, match=flag.lstrip("-").replace("-", ".") + ".* must be >= "):
            evaluate.main([checkpoint, flag, value, "--device", "cpu", "--quiet"])


def test_run_main_closes_live_progress_lines_before_an_error(capsys):
    def failing(argv):
        common.Progress(10, "work")  # left open, as a training loop interrupted by a UserError leaves it
        raise common.UserError("boom")
    with pytest.raises(SystemExit):
        common.run_main(failing)
    assert not common.Progress.live
    assert "error: boom" in capsys.readouterr().err


def test_cw_and_dlr_losses_match_hand_computation():
    z = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.5, 4.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    # CW margin: max_{i != y} z_i - z_y
    assert torch.allclose(common.cw_margin_loss(z, y), torch.tensor([2.0 - 3.0, 4.0 - 0.5]))
    # DLR: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3); sorted rows: [3,2,1,-1] and [4,1,0.5,0]
    assert torch.allclose(evaluate.dlr_loss(z, y), torch.tensor([-(3 - 2) / (3 - 1), -(0.5 - 4) / (4 - 0.5)]))
    # targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    t = torch.tensor([3, 2])
    want = torch.tensor([-(3 - -1) / (3 - (1 + -1) / 2), -(0.5 - 1) / (4 - (0.5 + 0) / 2)])
    assert torch.allclose(evaluate.dlr_targeted_loss(z, y, t), want)
    # DLR is invariant to shifting and scaling the logits; CE is not.
    assert torch.allclose(evaluate.dlr_loss(7 * z + 5, y), evaluate.dlr_loss(z, y), atol=1e-6)
