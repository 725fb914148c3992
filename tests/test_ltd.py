"""Tests for ltd.py: the TRADES/LTD loss against hand computations, the attack, AWP, temperatures, end to end."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common
import ltd
from tests.util import TINY


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box extra threads only spin."""
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


def hand_trades(z_nat, z_adv, y, beta, soft=None, soft_on="natural"):
    """The TRADES / LTD outer loss written with python floats only (math.exp / math.log)."""
    total = 0.0
    softs = soft.tolist() if soft is not None else [None] * len(y)
    for zn, za, t, s in zip(z_nat.tolist(), z_adv.tolist(), y.tolist(), softs):
        pn = [math.exp(v) / sum(math.exp(u) for u in zn) for v in zn]
        pa = [math.exp(v) / sum(math.exp(u) for u in za) for v in za]
        nat = -sum(sk * math.log(pk) for sk, pk in zip(s, pn)) if s and soft_on != "adversarial" else -math.log(pn[t])
        q = s if s and soft_on != "natural" else pn
        kl = sum(qk * (math.log(qk) - math.log(pk)) for qk, pk in zip(q, pa) if qk > 0)
        total += nat + beta * kl
    return total / len(y)


def test_trades_outer_loss_equals_hand_computation():
    # equal logits: CE = log 3, KL = 0
    z0 = torch.zeros(1, 3)
    assert ltd.ltd_outer_loss(z0, z0, torch.tensor([0])).item() == pytest.approx(math.log(3), abs=1e-6)
    # one sample by hand: z_nat = (0, ln 3) -> p = (1/4, 3/4); z_adv = 0 -> (1/2, 1/2); y = 1, beta = 2
    want = -math.log(0.75) + 2 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    got = ltd.ltd_outer_loss(torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2), torch.tensor([1]), beta=2.0)
    assert got.item() == pytest.approx(want, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    z_nat, z_adv = torch.randn(5, 4, generator=g) * 2, torch.randn(5, 4, generator=g) * 2
    y = torch.tensor([0, 3, 1, 2, 3])
    assert ltd.ltd_outer_loss(z_nat, z_adv, y, 6.0).item() == pytest.approx(hand_trades(z_nat, z_adv, y, 6.0), rel=1e-5)


@pytest.mark.parametrize("soft_on", ["natural", "adversarial", "both"])
def test_soft_label_loss_equals_hand_computation(soft_on):
    g = torch.Generator().manual_seed(2)
    z_nat, z_adv, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.tensor([1, 0, 4, 2])
    soft = F.softmax(torch.randn(4, 5, generator=g) / 0.5, 1)
    got = ltd.ltd_outer_loss(z_nat, z_adv, y, 6.0, soft, soft_on).item()
    assert got == pytest.approx(hand_trades(z_nat, z_adv, y, 6.0, soft, soft_on), rel=1e-5)
    assert got != pytest.approx(hand_trades(z_nat, z_adv, y, 6.0), rel=1e-3)  # the soft labels matter


def test_ltd_with_one_hot_labels_and_unit_temperature_is_trades():
    model, (x, y) = tiny_model().eval(), batch()
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    trades, _ = ltd.ltd_loss(model, x, x_adv, y, 6.0)
    for soft_on in ("natural", "adversarial"):
        one_hot, _ = ltd.ltd_loss(model, x, x_adv, y, 6.0, 1.0, F.one_hot(y, 10).float(), soft_on)
        if soft_on == "natural":
            assert torch.allclose(one_hot, trades, rtol=1e-5)
        else:  # one-hot KL target = CE on x_adv: a different loss (the check can tell them apart)
            assert not torch.allclose(one_hot, trades, rtol=1e-3)
    # tau_s divides the student's logits inside the loss
    z_nat, z_adv = model(x), model(x_adv)
    soft = F.softmax(torch.randn(len(y), 10), 1)
    got, logits = ltd.ltd_loss(model, x, x_adv, y, 6.0, 2.0, soft)
    assert torch.allclose(got, ltd.ltd_outer_loss(z_nat / 2, z_adv / 2, y, 6.0, soft), rtol=1e-5)
    assert torch.allclose(logits, z_adv / 2, atol=1e-6)


def test_trades_attack_stays_in_ball_raises_kl_and_restores_mode():
    model, (x, y) = tiny_model(), batch()
    model.train()
    bn_before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    x_adv = ltd.trades_attack(model, x, 8 / 255, 2 / 255, 5, tau_s=2.0)
    assert model.training
    assert all(torch.equal(v, bn_before[k]) for k, v in model.state_dict().items())  # eval mode: BN stats untouched
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        kl = lambda xa: F.kl_div(F.log_softmax(model(xa) / 2, 1), F.softmax(model(x) / 2, 1), reduction="batchmean")
        assert kl(x_adv) > 10 * kl((x + 0.001 * torch.randn_like(x)).clamp(0, 1))


def test_awp_perturbs_layerwise_and_restores_exactly():
    model, (x, y) = tiny_model(), batch()
    model.train()
    proxy = copy.deepcopy(model)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    loss_fn = lambda net: ltd.ltd_loss(net, x, x_adv, y, 6.0, 2.0)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = ltd.awp_perturb(model, proxy, loss_fn, gamma=0.05)
    moved = 0
    for name, w in model.named_parameters():
        if w.dim() > 1:  # ||w + v - w|| = gamma ||w|| layer by layer
            assert (w - before[name]).norm().item() == pytest.approx(0.05 * before[name].norm().item(), rel=1e-4)
            moved += 1
        else:
            assert torch.equal(w, before[name])
    assert moved == len(saved) > 5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k not in saved)  # BN buffers
    # the perturbation climbs the training loss (compared on copies so BN statistics play no part)
    perturbed = copy.deepcopy(model)
    ltd.awp_restore(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # exact restore
    with torch.no_grad():
        assert loss_fn(perturbed) > loss_fn(copy.deepcopy(model))


def test_bad_flags_are_user_errors():
    bads = (["--tau-t", "2", "--tau-s", "2"], ["--tau-t", "0"], ["--tau-s", "-1"], ["--no-distill", "--teacher", "t.pt"])
    for bad in bads:
        with pytest.raises(common.UserError):
            ltd.get_args(bad)
    a = ltd.get_args([])
    assert (a.arch, a.epochs, a.lr, a.batch_size, a.milestones, a.beta, a.awp, a.awp_gamma, a.awp_warmup) == \
        ("wrn-34-10", 200, 0.1, 128, [100, 150], 6.0, True, 5e-3, 10)
    assert a.tau_t < a.tau_s


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ltd")
    path = ltd.main(TINY + ["--epochs", "1", "--awp-warmup", "1", "--out-dir", str(out), "--tau-s", "3"])
    return out, path


def test_end_to_end_teacher_then_student_deploys_at_tau_s(trained, tmp_path):
    out, path = trained
    teacher_path = out / "teacher" / "best.pt"
    assert path == str(out / "best.pt") and teacher_path.exists()
    model, ck = common.build_model_from_checkpoint(path)
    t_model, t_ck = common.build_model_from_checkpoint(str(teacher_path))
    assert (ck["method"], ck["temperature"], t_ck["method"], t_ck["temperature"]) == ("ltd", 3.0, "trades-awp", 1.0)
    x, _ = batch()
    with torch.no_grad():
        deployed = model(x)
        model.temperature = 1.0
        assert torch.allclose(deployed, model(x) / 3.0, atol=1e-6)  # deployed logits = f_S(x) / tau_s
    import evaluate
    report = evaluate.main([path, "--preset", "quick", "--n", "64", "--device", "cpu",
                            "--json", str(tmp_path / "r.json")])
    assert report["temperature"] == 3.0 and report["method"] == "ltd"
    assert 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
    assert {a["name"] for a in report["attacks"]} >= {"pgd20", "cw"}


def test_given_teacher_baseline_and_mismatched_teacher(trained, tmp_path):
    out, _ = trained
    teacher = str(out / "teacher" / "best.pt")
    base = ltd.main(TINY + ["--epochs", "1", "--no-distill", "--no-awp", "--out-dir", str(tmp_path / "b")])
    assert common.load_checkpoint(base)["temperature"] == 1.0 and common.load_checkpoint(base)["method"] == "trades"
    student = ltd.main(TINY + ["--epochs", "1", "--teacher", teacher, "--soft-on", "both", "--teacher-input", "adv",
                               "--out-dir", str(tmp_path / "s")])
    assert not (tmp_path / "s" / "teacher").exists()  # the given teacher was used, none trained
    assert common.load_checkpoint(student)["temperature"] == 2.0
    ck = common.load_checkpoint(teacher)
    ck["dataset"] = "cifar10"  # same shape, other data: must be refused
    torch.save(ck, tmp_path / "wrong.pt")
    with pytest.raises(common.UserError, match="teacher"):
        ltd.main(TINY + ["--epochs", "1", "--teacher", str(tmp_path / "wrong.pt"), "--out-dir", str(tmp_path / "w")])
