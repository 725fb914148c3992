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
    # The CE-vs-margin gap is what flags it: the margin attack is scale-free, the CE one is blinded.
    assert any(r.startswith("CE-vs-margin gap") for r in scaled["reasons"])
    assert scaled["acc_pgd20_ce"] - scaled["acc_pgd20_cw"] > 0.5
    assert scaled["acc_pgd20_cw"] == pytest.approx(plain["acc_pgd20_cw"], abs=0.1)
    assert scaled["zero_grad_share"] > 0.5 and plain["zero_grad_share"] == 0
    assert scaled["mean_abs_logit"] > 100 * plain["mean_abs_logit"] * 0.99


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return pgd_at(TINY + ["--out-dir", str(out)])


def test_end_to_end_quick_report_has_every_field(checkpoint, tmp_path):
    js, png = tmp_path / "r.json", tmp_path / "g.png"
    report = evaluate.main([checkpoint, "--preset", "quick", "--n", "48", "--batch-size", "24", "--device", "cpu",
                            "--json", str(js), "--examples", str(png)])
    saved = json.loads(js.read_text())
    for key in ("checkpoint", "method", "arch", "dataset", "temperature", "epoch", "n", "eps", "alpha",
                "attack_settings", "device", "clean_acc", "attacks", "robust_acc", "seconds"):
        assert key in saved, key
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
    with pytest.raises(common.UserError, match="cannot read checkpoint"):
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


def test_missing_official_autoattack_is_a_clear_error(checkpoint, monkeypatch):
    monkeypatch.setattr(evaluate, "official_autoattack", lambda: None)
    with pytest.raises(common.UserError, match="needs the official package installed"):
        evaluate.main([checkpoint, "--attacks", "autoattack", "--device", "cpu"])
