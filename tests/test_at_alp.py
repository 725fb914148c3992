"""Tests for at_alp.py: attention maps, the loss against hand computations, the PGD-AT special case, end to end."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import at_alp
import common
from tests.util import TINY, batch, tiny_model


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
    with pytest.raises(ValueError):
        at_alp.at_alp_loss(model, x, y, eps, alpha, 1, stages=[3])  # wrn has stages 0..2


def test_joint_forward_is_one_train_mode_forward_of_the_concatenated_batch():
    # Train mode: the default must be ONE forward of [x; x'] (BatchNorm statistics over all 2B samples),
    # checked against that forward built by hand; two separate forwards give a different loss.
    (x, y), wc, wa, lam, beta = batch(), 0.3, 0.7, 0.5, 1000.0
    model = tiny_model()
    model.train()
    torch.manual_seed(2)
    joint, logits_adv = at_alp.at_alp_loss(model, x, y, 8 / 255, 2 / 255, 2, wc, wa, lam, beta)
    model = tiny_model()  # fresh copy: the call above moved the BN running stats the attack uses
    torch.manual_seed(2)
    model.eval()
    x_adv = common.pgd(model, x, y, 8 / 255, 2 / 255, 2)
    model.train()
    z, f = model(torch.cat([x, x_adv]), return_features=True)
    zc, za = z.chunk(2)
    at_term = sum(at_alp.attention_pairing_loss([m.chunk(2)[0]], [m.chunk(2)[1]]) for m in f["stages"])
    want = wc * F.cross_entropy(zc, y) + wa * F.cross_entropy(za, y) + lam * ((zc - za) ** 2).mean() + beta * at_term
    assert at_term > 0 and torch.equal(joint, want) and torch.equal(logits_adv, za)
    model = tiny_model()
    model.train()
    torch.manual_seed(2)
    sep, _ = at_alp.at_alp_loss(model, x, y, 8 / 255, 2 / 255, 2, wc, wa, lam, beta, separate_forward=True)
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


def test_defaults():
    a = at_alp.get_args([])
    assert (a.w_clean, a.w_adv, a.alp, a.at, a.steps) == (0.5, 0.5, 0.5, 1000.0, 10)
    assert a.at_stages is None and not a.targeted_ll and not a.separate_forward
    assert a.eps is None  # filled from the dataset by common.Run (8/255 for CIFAR)


def test_bad_flags_raise_user_error(tmp_path):
    for bad in (["--alp", "-1"], ["--w-clean", "0", "--w-adv", "0"], ["--steps", "0"], ["--at-stages", "-1"]):
        with pytest.raises(common.UserError):
            at_alp.get_args(bad)
    with pytest.raises(common.UserError, match="3 stage maps"):  # checked once in main, before training
        at_alp.main(TINY + ["--out-dir", str(tmp_path), "--at-stages", "0", "3"])


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
