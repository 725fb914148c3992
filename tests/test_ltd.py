"""Tests for ltd.py: the TRADES/LTD loss against hand computations, the attack, AWP, temperatures, end to end."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common
import ltd
from tests.util import TINY, batch, tiny_model


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


def torch_trades(z_nat, z_adv, y, beta, soft=None):
    """Hand TRADES in differentiable torch ops: the clean target softmax(z_nat) keeps its gradient."""
    lp_nat, lp_adv = z_nat.log_softmax(1), z_adv.log_softmax(1)
    natural = -lp_nat.gather(1, y[:, None]).mean() if soft is None else -(soft * lp_nat).sum(1).mean()
    return natural + beta * (lp_nat.exp() * (lp_nat - lp_adv)).sum(1).mean()


@pytest.mark.parametrize("with_soft", [False, True])
def test_outer_loss_gradients_equal_hand_trades(with_soft):
    g = torch.Generator().manual_seed(3)
    z_nat, z_adv = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    y, soft = torch.tensor([0, 4, 1, 2, 3, 1]), F.softmax(torch.randn(6, 5, generator=g), 1) if with_soft else None
    zs = [z_nat.requires_grad_(), z_adv.requires_grad_()]
    got = torch.autograd.grad(ltd.ltd_outer_loss(z_nat, z_adv, y, 6.0, soft), zs)
    want = torch.autograd.grad(torch_trades(z_nat, z_adv, y, 6.0, soft), zs)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # the check can tell: a detached clean target changes the gradient w.r.t. z_nat
    lp_nat, lp_adv = z_nat.log_softmax(1), z_adv.log_softmax(1)
    wrong = -lp_nat.gather(1, y[:, None]).mean() + 6.0 * (lp_nat.exp().detach() * (lp_nat - lp_adv)).sum(1).mean()
    assert not torch.allclose(torch.autograd.grad(wrong, z_nat)[0], want[0], rtol=1e-2)


def test_teacher_soft_labels_by_hand():
    teacher = torch.nn.Identity().eval()  # the "teacher" returns its input as logits
    f = torch.tensor([[0.0, math.log(3)], [math.log(2), 0.0]])
    # tau_t = 0.5: logits (0, 2 ln 3) -> (1, 9) / 10 and (2 ln 2, 0) -> (4, 1) / 5
    want = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert torch.allclose(ltd.teacher_soft_labels(teacher, f, 0.5), want, atol=1e-6)
    with pytest.raises(AssertionError, match="eval"):  # a teacher in train mode would update its BN statistics
        ltd.teacher_soft_labels(teacher.train(), f, 0.5)


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


def test_trades_attack_is_pgd_on_kl_at_tau_s_in_eval_mode():
    model, (x, y) = tiny_model(), batch()
    model.train()
    bn_before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    x_adv = ltd.trades_attack(model, x, 8 / 255, 2 / 255, 5, tau_s=2.0)
    assert model.training
    assert all(torch.equal(v, bn_before[k]) for k, v in model.state_dict().items())  # eval mode: BN stats untouched
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()  # the same attack written out: KL(softmax(f(x)/2) || softmax(f(x')/2)) from x + 0.001 N(0, 1)
    with torch.no_grad():
        target = F.softmax(model(x) / 2, 1)
    torch.manual_seed(0)
    want = common.pgd(lambda v: model(v) / 2, x, None, 8 / 255, 2 / 255, 5, loss="kl", target=target,
                      random_start="normal")
    assert torch.equal(x_adv, want)
    with torch.no_grad():
        kl = lambda xa: F.kl_div(F.log_softmax(model(xa) / 2, 1), target, reduction="batchmean")
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
    bads = (["--tau-t", "0"], ["--tau-s", "-1"], ["--no-distill", "--teacher", "t.pt"])
    for bad in bads:
        with pytest.raises(common.UserError):
            ltd.get_args(bad)
    a = ltd.get_args([])
    assert (a.arch, a.epochs, a.lr, a.batch_size, a.milestones, a.beta, a.awp, a.awp_gamma, a.awp_warmup) == \
        ("wrn-34-10", 200, 0.1, 128, [99, 149], 6.0, True, 5e-3, 10)
    assert a.tau_t < a.tau_s
    # AWP from the AWP code's epoch 10 of 200; a short run (the CPU CIFAR-10 preset's 4 epochs) from its middle
    assert [ltd.get_args(["--epochs", str(e)]).awp_warmup for e in (1, 4, 30)] == [1, 2, 10]
    assert ltd.get_args(["--dataset", "mnist", "--epochs", "30"]).awp_warmup == 2  # MNIST's own entry
    assert ltd.get_args(["--tau-t", "4", "--tau-s", "1"]).tau_t == 4  # only "different" is required
    assert ltd.get_args(["--no-distill", "--tau-t", "2", "--tau-s", "2"]).no_distill  # taus ignored there
    assert ltd.get_args(["--tau-t", "2", "--tau-s", "2"]).tau_t == 2  # equal: allowed since the paper's v4


@pytest.mark.parametrize("bn_order,order", [("trades-awp", "acc"), ("trades", "cac")])
def test_bn_running_stats_follow_the_reference_forward_order(bn_order, order):
    """One LTD step leaves the BN running statistics the reference code leaves (TRADES-AWP: adv, clean, clean;
    TRADES: clean, adv, clean), with the same loss and gradients as the plain clean, adv forward."""
    model = tiny_model().train()
    x, y = batch(16)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)  # far from x: its batch statistics differ clearly
    ref, plain = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for c in order:  # the reference order, by hand
            ref(x_adv if c == "a" else x)
    soft = F.softmax(torch.randn(16, 10), 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _ = ltd.ltd_loss(model, x, x_adv, y, 6.0, 2.0, soft, "natural", bn_order)
    loss.backward()
    opt.step()
    plain_loss, _ = ltd.ltd_loss(plain, x, x_adv, y, 6.0, 2.0, soft, "natural", None)
    plain_loss.backward()
    assert torch.allclose(loss, plain_loss, atol=1e-6)  # same loss, same gradients
    assert all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in zip(model.parameters(), plain.parameters()))
    bufs = lambda m: {k: v for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    got, want, old = bufs(model), bufs(ref), bufs(plain)
    assert got.keys() == want.keys() and len(got) > 0
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(old[k], want[k], atol=1e-4) for k in got if "running_mean" in k)  # order matters


def install_spies(mp, events):
    """Wrap the method's functions (and the epoch end) so a run logs what each call received."""
    attack, soft_labels, loss, perturb = ltd.trades_attack, ltd.teacher_soft_labels, ltd.ltd_loss, ltd.awp_perturb
    end_epoch = common.Trainer.end_epoch

    def spy_attack(model, x, eps, alpha, steps, tau_s=1.0):
        x_adv = attack(model, x, eps, alpha, steps, tau_s)
        events.append(("attack", tau_s, x, x_adv))
        return x_adv

    def spy_soft(teacher, x, tau_t):
        p = soft_labels(teacher, x, tau_t)
        events.append(("teacher", tau_t, x, p))
        return p

    def spy_loss(model, x, x_adv, y, beta=6.0, tau_s=1.0, soft=None, soft_on="natural", bn_order="trades-awp"):
        events.append(("loss", tau_s, soft, soft_on, bn_order))
        return loss(model, x, x_adv, y, beta, tau_s, soft, soft_on, bn_order)

    mp.setattr(ltd, "trades_attack", spy_attack)
    mp.setattr(ltd, "teacher_soft_labels", spy_soft)
    mp.setattr(ltd, "ltd_loss", spy_loss)
    mp.setattr(ltd, "awp_perturb", lambda *a: events.append(("awp",)) or perturb(*a))
    mp.setattr(common.Trainer, "end_epoch", lambda self, *a, **k: events.append(("epoch",)) or end_epoch(self, *a, **k))


def split_epochs(events):
    epochs, cur = [], []
    for e in events:
        if e[0] == "epoch":
            epochs.append(cur)
            cur = []
        else:
            cur.append(e)
    return epochs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out, events = tmp_path_factory.mktemp("ltd"), []
    with pytest.MonkeyPatch.context() as mp:
        install_spies(mp, events)
        path = ltd.main(TINY + ["--epochs", "2", "--teacher-epochs", "1", "--awp-warmup", "2", "--out-dir", str(out),
                                "--tau-s", "3", "--tau-t", "0.25", "--steps", "1"])
    return out, path, split_epochs(events)


def test_training_loop_passes_temperatures_teacher_input_and_awp_gate(trained):
    teacher_epoch, student_1, student_2 = trained[2]  # teacher 1 epoch, student 2 epochs, AWP from epoch 2
    kinds = lambda ev, k: [e for e in ev if e[0] == k]
    for ev in (teacher_epoch, student_1, student_2):
        assert len(kinds(ev, "attack")) == 7  # 448 training images / batch 64
    # stage 1, the TRADES teacher: tau_s = 1, one-hot labels, no AWP before the warm-up epoch
    assert {e[1] for e in kinds(teacher_epoch, "attack")} == {e[1] for e in kinds(teacher_epoch, "loss")} == {1.0}
    assert not kinds(teacher_epoch, "teacher") and all(e[2] is None for e in kinds(teacher_epoch, "loss"))
    assert not kinds(teacher_epoch, "awp") and not kinds(student_1, "awp")
    assert len(kinds(student_2, "awp")) == 7  # from epoch --awp-warmup (1-based) on, every batch
    for ev in (student_1, student_2):  # stage 2, LTD: tau_s in attack and loss, tau_t on the clean x
        attacks, teach = kinds(ev, "attack"), kinds(ev, "teacher")
        assert {e[1] for e in attacks} == {e[1] for e in kinds(ev, "loss")} == {3.0}
        assert [e[1] for e in teach] == [0.25] * 7
        assert all(torch.equal(t[2], a[2]) for t, a in zip(teach, attacks))
        softs = [id(t[3]) for t in teach]
        assert all(id(e[2]) in softs for e in kinds(ev, "loss"))  # the loss gets the teacher's soft labels
    for ev in (teacher_epoch, student_1, student_2):  # the training forward follows TRADES-AWP's BN order
        assert [e[4] for e in kinds(ev, "loss") if e[4] is not None] == ["trades-awp"] * 7


def test_end_to_end_teacher_then_student_deploys_at_tau_s(trained, tmp_path):
    out, path, _ = trained
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


def test_given_teacher_baseline_and_mismatched_teacher(trained, tmp_path, monkeypatch, capsys):
    out, _, _ = trained
    teacher = str(out / "teacher" / "best.pt")
    events = []
    with monkeypatch.context() as mp:
        install_spies(mp, events)
        base = ltd.main(TINY + ["--epochs", "1", "--no-distill", "--no-awp", "--out-dir", str(tmp_path / "b")])
    assert {e[4] for e in events if e[0] == "loss"} == {"trades"}  # TRADES's BN order: clean, adv, clean
    ck = common.load_checkpoint(base)
    assert ck["temperature"] == 1.0 and ck["method"] == "trades"
    assert ck["args"]["recipe"] == "TRADES loss with the TRADES-AWP schedule (no AWP)"
    assert "TRADES loss with the TRADES-AWP schedule" in capsys.readouterr().out
    # tau_t == tau_s trains (the paper's v4 no longer asks for different temperatures), with a note
    same = ltd.main(TINY + ["--epochs", "1", "--teacher", teacher, "--tau-t", "2", "--tau-s", "2", "--steps", "1",
                            "--out-dir", str(tmp_path / "same")])
    assert common.load_checkpoint(same)["temperature"] == 2.0
    assert "tau_t == tau_s" in capsys.readouterr().out
    events = []
    with monkeypatch.context() as mp:
        install_spies(mp, events)
        student = ltd.main(TINY + ["--epochs", "1", "--teacher", teacher, "--soft-on", "both", "--teacher-input", "adv",
                                   "--out-dir", str(tmp_path / "s")])
    attacks, teach = [e for e in events if e[0] == "attack"], [e for e in events if e[0] == "teacher"]
    assert len(teach) == len(attacks) == 7 and all(torch.equal(t[2], a[3]) for t, a in zip(teach, attacks))  # x_adv
    assert {e[3] for e in events if e[0] == "loss"} == {"both"}
    assert not (tmp_path / "s" / "teacher").exists()  # the given teacher was used, none trained
    assert common.load_checkpoint(student)["temperature"] == 2.0
    ck = common.load_checkpoint(teacher)
    ck["dataset"] = "cifar10"  # same shape, other data: must be refused
    torch.save(ck, tmp_path / "wrong.pt")
    with pytest.raises(common.UserError, match="teacher .* is for cifar10"):
        ltd.main(TINY + ["--epochs", "1", "--teacher", str(tmp_path / "wrong.pt"), "--out-dir", str(tmp_path / "w")])


def test_a_bad_student_arch_is_refused_before_the_teacher_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(ltd, "train_stage", lambda *a, **k: pytest.fail("a stage started training"))
    with pytest.raises(common.UserError, match=r"wrn depth must be 6n\+4"):
        ltd.main(TINY + ["--arch", "wrn-11-1", "--teacher-arch", "wrn-10-1", "--out-dir", str(tmp_path)])


def test_awp_warmup_past_the_last_epoch_is_said_at_the_start(tmp_path, monkeypatch, capsys):
    full = common.synthetic_data
    monkeypatch.setattr(common, "synthetic_data", lambda: full(n_train=256, n_test=64))  # keep CPU time low
    ltd.main(TINY + ["--no-distill", "--epochs", "1", "--awp-warmup", "2", "--steps", "1", "--out-dir", str(tmp_path / "a")])
    assert "--awp-warmup 2 > --epochs 1: AWP is never on" in capsys.readouterr().out
    ltd.main(TINY + ["--no-distill", "--epochs", "1", "--steps", "1", "--out-dir", str(tmp_path / "b")])
    assert "never on" not in capsys.readouterr().out  # the default: AWP from epoch 1 of a 1-epoch run
