"""Tests for at_alp.py: attention maps, the loss against hand computations, the PGD-AT special case, end to end."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import at_alp
import common
from tests.util import TINY


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: OpenMP threads spin against each other (~50x slower). Restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return common.build_model("wrn-10-1", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)


def batch(n=8):
    (x, y), _ = common.load_dataset("synthetic", train=False)
    return x[:n].float() / 255, y[:n]


def test_attention_map_hand_value_norm_and_sign():
    # one sample, 2 channels, 2x2: channel mean of squares = [[(1+9)/2, 0], [2, (4+4)/2]] = [5, 0, 2, 4]
    f = torch.tensor([[[[1., 0.], [2., 2.]], [[3., 0.], [0., -2.]]]])
    v = torch.tensor([5., 0., 2., 4.])
    assert torch.allclose(at_alp.attention_map(f), (v / v.norm())[None])
    g = torch.randn(5, 7, 6, 6)
    a = at_alp.attention_map(g)
    assert a.shape == (5, 36)
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(at_alp.attention_map(-g), a)  # squared: sign of activations irrelevant
    assert torch.allclose(at_alp.attention_map(3.0 * g), a, atol=1e-6)  # normalised: scale irrelevant


def test_attention_pairing_loss_zero_iff_same_and_hand_value():
    torch.manual_seed(0)
    s1 = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4)]
    s2 = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4)]
    assert at_alp.attention_pairing_loss(s1, s1).item() == 0.0
    assert at_alp.attention_pairing_loss(s1, [-m for m in s1]).item() < 1e-12  # sign-flipped: same attention
    got = at_alp.attention_pairing_loss(s1, s2)
    assert got.item() > 0
    norm = lambda m: (m ** 2).sum(1).flatten(1) / (m ** 2).sum(1).flatten(1).norm(dim=1, keepdim=True)
    want = sum(((norm(a) - norm(b)) ** 2).sum() / (a.shape[0] * a.shape[2] * a.shape[3]) for a, b in zip(s1, s2))
    assert torch.allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError):
        at_alp.attention_pairing_loss(s1, s2[:1])


def test_plain_pgd_at_special_case_equals_madry_in_train_mode():
    model, (x, y) = tiny_model(), batch()
    model.train()
    torch.manual_seed(5)
    loss, logits = at_alp.at_alp_loss(model, x, y, 8 / 255, 2 / 255, 3, w_clean=0, w_adv=1, lam_alp=0, beta_at=0)
    assert model.training  # the attack ran in eval mode, the mode was restored
    model2 = tiny_model()  # fresh copy: the first call's train-mode forward moved the BN running stats
    torch.manual_seed(5)
    model2.eval()
    x_adv = common.pgd(model2, x, y, 8 / 255, 2 / 255, 3)
    model2.train()
    ref_logits = model2(x_adv)
    assert torch.allclose(loss, F.cross_entropy(ref_logits, y), atol=1e-6)
    assert torch.allclose(logits, ref_logits, atol=1e-5)


@pytest.mark.parametrize("separate", [False, True])
def test_full_loss_matches_hand_computation_in_eval_mode(separate):
    # Eval mode: BatchNorm uses running stats, so the joint [x; x'] forward and two separate forwards
    # must agree exactly; in train mode they differ by design (batch statistics over 2B vs B).
    model, (x, y) = tiny_model(), batch()
    model.eval()
    eps, alpha, steps, wc, wa, lam, beta = 8 / 255, 2 / 255, 2, 0.3, 0.7, 0.5, 1000.0
    torch.manual_seed(3)
    loss, logits_adv = at_alp.at_alp_loss(model, x, y, eps, alpha, steps, wc, wa, lam, beta,
                                          stages=[0, 2], separate_forward=separate)
    got_grad = torch.autograd.grad(loss, [model.conv1.weight, model.fc.weight])
    torch.manual_seed(3)
    x_adv = common.pgd(model, x, y, eps, alpha, steps)
    zc, fc = model(x, return_features=True)
    za, fa = model(x_adv, return_features=True)
    amap = lambda m: F.normalize((m ** 2).sum(1).flatten(1), dim=1)
    at_term = sum(((amap(fc["stages"][j]) - amap(fa["stages"][j])) ** 2).mean() for j in (0, 2))
    want = wc * F.cross_entropy(zc, y) + wa * F.cross_entropy(za, y) + lam * ((zc - za) ** 2).mean() + beta * at_term
    assert at_term > 0 and ((zc - za) ** 2).mean() > 0  # both pairing terms are live in this check
    assert torch.allclose(loss, want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logits_adv, za, atol=1e-4)
    # gradients flow through both branches of both pairing terms (no stop-gradient), as in the hand loss
    for g, h in zip(got_grad, torch.autograd.grad(want, [model.conv1.weight, model.fc.weight])):
        assert torch.allclose(g, h, rtol=1e-3, atol=1e-6)
    with pytest.raises(common.UserError):
        at_alp.at_alp_loss(model, x, y, eps, alpha, 1, stages=[3])  # wrn has stages 0..2


def test_joint_forward_shares_batchnorm_statistics_in_train_mode():
    model, (x, y) = tiny_model(), batch()
    model.train()
    torch.manual_seed(2)
    joint, _ = at_alp.at_alp_loss(model, x, y, 8 / 255, 2 / 255, 2, beta_at=0)
    model = tiny_model()
    model.train()
    torch.manual_seed(2)
    sep, _ = at_alp.at_alp_loss(model, x, y, 8 / 255, 2 / 255, 2, beta_at=0, separate_forward=True)
    assert abs(joint.item() - sep.item()) > 1e-6  # the two options really differ in train mode


def test_targeted_ll_moves_towards_least_likely_class():
    model, (x, y) = tiny_model(), batch(16)
    model.eval()
    with torch.no_grad():
        target = model(x).argmin(1)
    x_adv = at_alp.craft_adversary(model, x, y, 16 / 255, 4 / 255, 5, targeted_ll=True)
    assert (x_adv - x).abs().max() <= 16 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before, after = F.cross_entropy(model(x), target), F.cross_entropy(model(x_adv), target)
    assert after < before
    x_unt = at_alp.craft_adversary(model, x, y, 16 / 255, 4 / 255, 5)
    with torch.no_grad():
        assert F.cross_entropy(model(x_unt), y) > F.cross_entropy(model(x), y)


def test_bad_flags_raise_user_error():
    for bad in (["--alp", "-1"], ["--w-clean", "0", "--w-adv", "0"], ["--steps", "0"], ["--at-stages", "-1"]):
        with pytest.raises(common.UserError):
            at_alp.get_args(bad)


def test_end_to_end_train_then_evaluate_white_and_gray_box(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    path = at_alp.main(TINY + ["--epochs", "1", "--out-dir", str(a), "--at-stages", "1", "2"])
    assert path == os.path.join(str(a), "best.pt") and os.path.isfile(path)
    model, ckpt = common.build_model_from_checkpoint(path)
    assert ckpt["method"] == "at_alp" and ckpt["temperature"] == 1.0 and ckpt["args"]["at"] == 1000.0
    log = [json.loads(line) for line in open(a / "log.jsonl")]
    assert len(log) == 1 and log[0]["val_pgd10"] is not None and log[0]["loss"] > 0
    # the baseline (plain PGD-AT, here with ALP's least-likely attack) as an independently trained gray-box source
    src = at_alp.main(TINY + ["--epochs", "1", "--seed", "1", "--out-dir", str(b), "--alp", "0", "--at", "0",
                              "--w-clean", "0", "--w-adv", "1", "--targeted-ll"])
    assert common.load_checkpoint(src)["args"]["w_clean"] == 0.0
    import evaluate
    report = evaluate.main([path, "--preset", "quick", "--n", "64", "--device", "cpu", "--transfer-from", src,
                            "--json", str(tmp_path / "r.json")])
    assert report["method"] == "at_alp" and report["arch"] == "wrn-10-1"
    assert 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
    assert [x["name"] for x in report["attacks"]] == ["pgd20", "cw", "transfer"]
    assert json.load(open(tmp_path / "r.json"))["method"] == "at_alp"
