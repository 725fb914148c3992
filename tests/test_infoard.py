"""Tests for infoard.py: ASA budgets, the MIM terms against hand computations, the frozen teacher, end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import evaluate
import infoard

EPS = 8 / 255


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    student = common.build_model("wrn-10-1", 10).eval()
    teacher = common.build_model("wrn-10-2", 10).eval()  # deliberately not frozen: the loss must not need it
    return student, teacher


def test_asa_eps_range_and_monotone():
    p = torch.linspace(0, 1, 101)
    e = infoard.asa_eps(p, EPS, 4 / 255, 12 / 255)
    assert e.min() >= 4 / 255 - 1e-9 and e.max() <= 12 / 255 + 1e-9
    assert math.isclose(e[0].item(), 4 / 255, rel_tol=1e-6) and math.isclose(e[-1].item(), 12 / 255, rel_tol=1e-6)
    assert math.isclose(e[50].item(), EPS, rel_tol=1e-6)  # p = 0.5 gives the base budget
    assert (e.diff() > 0).all()  # strictly increasing in the teacher's confidence
    clipped = infoard.asa_eps(p, EPS, 5 / 255, 10 / 255)
    assert clipped.min() >= 5 / 255 - 1e-9 and clipped.max() <= 10 / 255 + 1e-9 and (clipped.diff() >= 0).all()


@pytest.mark.parametrize("inner", ["rslad", "adaad"])
def test_each_adversarial_example_respects_its_own_eps(inner):
    student, teacher = tiny_pair()
    teacher.temperature = 0.02  # sharpen the random teacher so confidences (and budgets) spread out
    torch.manual_seed(1)
    x = 0.2 + 0.6 * torch.rand(12, 3, 16, 16)  # away from 0/1 so clamping cannot shrink the perturbation
    t_logits = teacher(x)
    ranked = t_logits.argsort(1, descending=True)
    y = ranked[torch.arange(12), torch.arange(12) % 10]  # labels from the teacher's most to least likely class
    x_adv, eps_i, _ = infoard.asa_attack(student, teacher, x, y, t_logits, EPS, 2 / 255, 10, "conf", inner)
    expected = infoard.asa_eps(F.softmax(t_logits, 1).gather(1, y[:, None]).squeeze(1), EPS, 4 / 255, 12 / 255)
    assert torch.allclose(eps_i, expected)
    assert eps_i.max() - eps_i.min() > 2 / 255  # the test really has different budgets
    linf = (x_adv - x).flatten(1).abs().amax(1)
    assert (linf <= eps_i + 1e-6).all()
    assert (linf >= eps_i - 1e-5).all()  # sign steps of eps_i/4 reach each sample's own boundary
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not student.training  # mode restored (it came in eval)
    # the step is each sample's own eps_i / 4: two sign steps reach eps_i / 2 plus at most ~0.004 of the
    # 0.001 N(0,1) start (10 steps reach any boundary, so check 2); one shared step cannot fit a window of
    # width 0.005 on budgets this far apart
    assert (eps_i / 2).max() - (eps_i / 2).min() > 0.006
    x_adv, _, _ = infoard.asa_attack(student, teacher, x, y, t_logits, EPS, 2 / 255, 2, "conf", inner)
    excess = (x_adv - x).flatten(1).abs().amax(1) - eps_i / 2
    assert ((excess > -0.001) & (excess < 0.005)).all()


class MeanThreshold(torch.nn.Module):
    """Predicts class 0 when the mean pixel is above 0.5, else class 1 (margin = |mean - 0.5|): a perturbation
    of eps moves the mean by at most eps, so whether it resists a budget is known in advance."""

    def forward(self, x):
        m = 100 * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([m, -m], 1)


def test_asa_off_and_instance_rule_moves_eps_the_right_way():
    student, teacher = tiny_pair()
    teacher.temperature = 0.02
    torch.manual_seed(2)
    x = 0.2 + 0.6 * torch.rand(32, 3, 16, 16)
    with torch.no_grad():
        y = student(x).argmax(1)
    t_logits = teacher(x)
    student.train()
    x_adv, eps_i, nxt = infoard.asa_attack(student, teacher, x, y, t_logits, EPS, 2 / 255, 3, "off")
    assert torch.allclose(eps_i, torch.full_like(eps_i, EPS)) and nxt is None
    assert ((x_adv - x).abs().amax((1, 2, 3)) <= EPS + 1e-6).all()
    assert student.training  # mode restored
    # the student-driven rule on a model whose robustness per sample is known
    g, lo, hi = 2 / 255, 4 / 255, 12 / 255
    x = torch.tensor([0.8, 0.8, 0.5 + 9 / 255, 0.8, 0.8, 0.5 + 11 / 255]).view(6, 1, 1, 1).expand(6, 3, 4, 4).clone()
    y = torch.tensor([0, 1, 0, 0, 1, 0])
    eps_i = torch.tensor([EPS, EPS, EPS, hi, lo, EPS])
    # 0 resists everywhere: up; 1 fails everywhere: down; 2 resists 8/255 but not 10/255: stays;
    # 3 resists at the top: stays at hi; 4 fails at the bottom: stays at lo; 5 resists 10/255 (margin 11/255): up
    t_logits = 10 * F.one_hot(y, 2).float()  # the teacher agrees with y, so the KL attack pushes towards the wrong side
    x_adv, used, nxt = infoard.asa_attack(MeanThreshold(), None, x, y, t_logits, EPS, 2 / 255, 10, "instance",
                                          gamma=g, eps_i=eps_i)
    assert torch.equal(used, eps_i)
    assert ((x_adv - x).abs().amax((1, 2, 3)) <= eps_i + 1e-6).all()
    want = torch.tensor([EPS + g, EPS - g, EPS, hi, lo, EPS + g])
    torch.testing.assert_close(nxt, want)
    with pytest.raises(ValueError, match="eps_i"):
        infoard.asa_attack(MeanThreshold(), None, x, y, t_logits, EPS, 2 / 255, 1, "instance")
    # through the drop-in loss: the table rows of the batch move, nothing else
    table = torch.full((10,), EPS)
    idx = torch.tensor([7, 2, 5, 0, 9, 4])
    table[0], table[9] = hi, lo
    student, teacher = tiny_pair()
    torch.manual_seed(3)
    xb, yb = torch.rand(6, 3, 16, 16), torch.randint(10, (6,))
    infoard.infoard_loss(student.train(), teacher, None, xb, yb, steps=2, asa="instance", w_nce=0, w_at=0,
                         table=table, idx=idx)
    others = torch.ones(10, dtype=torch.bool)
    others[idx] = False
    assert (table[others] == EPS).all()
    moved = (table[idx] - torch.tensor([EPS, EPS, EPS, hi, lo, EPS])).abs()
    assert ((moved < 1e-7) | ((moved - 1.9 / 255).abs() < 1e-6)).all() and moved.max() > 0
    assert table.min() >= lo - 1e-7 and table.max() <= hi + 1e-7


class CountingThreshold(MeanThreshold):
    """MeanThreshold that records (train mode, gradient enabled) of every forward."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return super().forward(x)


def test_instance_rule_options_beta_zero_now_and_ce_probe():
    """IAAT's choices as options, on a model whose robust radius per sample is known (as above)."""
    g, lo, hi = 2 / 255, 4 / 255, 12 / 255
    x = torch.tensor([0.8, 0.8, 0.5 + 9 / 255, 0.8, 0.8, 0.5 + 11 / 255]).view(6, 1, 1, 1).expand(6, 3, 4, 4).clone()
    y = torch.tensor([0, 1, 0, 0, 1, 0])
    wrong = torch.tensor([False, True, False, False, True, False])  # misclassified even clean
    eps_i = torch.tensor([EPS, EPS, EPS, hi, lo, EPS])
    target = torch.tensor([EPS + g, EPS - g, EPS, hi, lo, EPS + g])  # the up/stay/down decision (previous test)
    t_logits = 10 * F.one_hot(y, 2).float()

    def run(start=eps_i, **options):
        model = CountingThreshold().eval()
        out = infoard.asa_attack(model, None, x, y, t_logits, EPS, 2 / 255, 10, "instance", gamma=g, eps_i=start,
                                 **options)
        assert not model.training  # mode restored
        attacks = [sum(c == (mode, True) for c in model.calls) / 10 for mode in (False, True)]  # eval, train
        return (*out, attacks)

    x_adv, used, nxt, attacks = run(beta=0.1)  # exponential average towards the decision
    torch.testing.assert_close(nxt, 0.1 * target + 0.9 * eps_i)
    assert torch.equal(used, eps_i) and attacks == [2, 0]  # the training attack serves as the decision's
    _, _, nxt, _ = run(beta=0.5, zero_wrong=True)  # IAAT: no attack for images misclassified clean
    torch.testing.assert_close(nxt, 0.5 * torch.where(wrong, 0.0, target) + 0.5 * eps_i)
    zeroed = torch.where(wrong, 0.0, eps_i)
    assert torch.equal(run(zeroed, zero_wrong=True)[1], zeroed)  # a zeroed row is attacked at 0, not at lo
    assert torch.equal(run(zeroed)[1], torch.where(wrong, lo, eps_i))  # without the option: the floor lo
    x_adv, used, nxt, attacks = run(apply="now")  # IAAT: decide first, train this batch at the new eps_i
    torch.testing.assert_close(nxt, target)
    assert torch.equal(used, nxt) and attacks == [3, 0]
    linf = (x_adv - x).flatten(1).abs().amax(1)
    assert (linf <= nxt + 1e-6).all() and (linf >= nxt - 1e-5).all()
    x_adv, used, nxt, attacks = run(probe="ce")  # IAAT: decisions from CE attacks in train mode
    torch.testing.assert_close(nxt, target)
    assert torch.equal(used, eps_i) and attacks == [1, 2]
    assert ((x_adv - x).flatten(1).abs().amax(1) >= eps_i - 1e-5).all()


def test_info_nce_chance_and_aligned():
    B, tau = 8, 0.07
    same = F.normalize(torch.ones(B, 16), dim=1)  # every negative identical to the positive
    for sym in (True, False):
        assert math.isclose(infoard.info_nce(same, same, tau, sym).item(), math.log(B), rel_tol=1e-5)
    eye, tau = torch.eye(B, 16), 0.5  # aligned, orthonormal pairs: positive logit 1/tau, negatives 0
    hand = math.log(1 + (B - 1) * math.exp(-1 / tau))
    assert math.isclose(infoard.info_nce(eye, eye, tau).item(), hand, rel_tol=1e-5)
    assert hand < math.log(B)
    shuffled = eye[torch.roll(torch.arange(B), 1)]  # each positive now orthogonal, one negative matches
    assert infoard.info_nce(eye, shuffled, tau).item() > math.log(B)
    torch.manual_seed(9)  # general case by hand: student-anchored rows and teacher-anchored columns, averaged
    za, zb = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    s = [[sum(a * b for a, b in zip(ra, rb)) / 0.07 for rb in zb.tolist()] for ra in za.tolist()]
    rows = sum(-s[i][i] + math.log(sum(math.exp(v) for v in s[i])) for i in range(3)) / 3
    cols = sum(-s[i][i] + math.log(sum(math.exp(s[j][i]) for j in range(3))) for i in range(3)) / 3
    assert math.isclose(infoard.info_nce(za, zb, 0.07).item(), (rows + cols) / 2, rel_tol=1e-5)
    assert math.isclose(infoard.info_nce(za, zb, 0.07, symmetric=False).item(), rows, rel_tol=1e-5)


def test_rslad_kl_matches_hand_computation():
    torch.manual_seed(3)
    t, sa, sc = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)

    def kl(p_logits, q_logits):  # sum_c p log(p/q), averaged over the batch, written out
        total = 0.0
        for pr, qr in zip(p_logits.tolist(), q_logits.tolist()):
            zp, zq = sum(math.exp(v) for v in pr), sum(math.exp(v) for v in qr)
            total += sum(math.exp(a) / zp * (math.log(math.exp(a) / zp) - math.log(math.exp(b) / zq)) for a, b in zip(pr, qr))
        return total / len(p_logits)

    hand = 5 / 6 * kl(t, sa) + 1 / 6 * kl(t, sc)
    assert math.isclose(infoard.rslad_kl(t, sa, sc).item(), hand, rel_tol=1e-5)
    assert infoard.rslad_kl(t, t, t).abs().item() < 1e-6


@pytest.mark.parametrize("classes", [10, 100])
def test_rslad_mode_loss_is_rslad_b_c_mean(classes):
    """RSLAD's code: element-wise KL averaged over B*C (x10 on CIFAR-100). RSLAD mode (w_kl 0.1 on the batchmean
    KL) must give that number on fixed logits."""
    torch.manual_seed(10)
    t, sa, sc = torch.randn(4, classes), 3 * torch.randn(4, classes), torch.randn(4, classes)

    def bc_mean(p_logits, q_logits):  # mean over all B*C elements of p (log p - log q), written out
        terms = []
        for pr, qr in zip(p_logits.tolist(), q_logits.tolist()):
            zp, zq = sum(math.exp(v) for v in pr), sum(math.exp(v) for v in qr)
            terms += [math.exp(a) / zp * (a - math.log(zp) - b + math.log(zq)) for a, b in zip(pr, qr)]
        return sum(terms) / len(terms)

    scale = 10 if classes == 100 else 1  # RSLAD's CIFAR-100 scripts multiply each KL by 10
    hand = scale * (5 / 6 * bc_mean(t, sa) + 1 / 6 * bc_mean(t, sc))
    w = infoard.get_args(["--asa", "off", "--mim", "logit"]).w_kl
    assert math.isclose((w * infoard.rslad_kl(t, sa, sc)).item(), hand, rel_tol=1e-5)
    assert not math.isclose(infoard.rslad_kl(t, sa, sc).item(), hand, rel_tol=0.5)  # w_kl 1 is another scale


def test_attention_loss_hand_and_pooling():
    torch.manual_seed(4)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)
    a_s = fs.pow(2).mean(1).reshape(2, 16)
    a_t = ft.pow(2).mean(1).reshape(2, 4, 2, 4, 2).mean((2, 4)).reshape(2, 16)  # 2x2 average pool by hand
    a_s, a_t = a_s / a_s.norm(dim=1, keepdim=True), a_t / a_t.norm(dim=1, keepdim=True)
    hand = ((a_s - a_t) ** 2).mean()
    assert torch.allclose(infoard.attention_loss([fs], [ft]), hand, atol=1e-7)
    assert torch.allclose(infoard.attention_loss([ft], [fs]), hand, atol=1e-7)  # pooling goes to the smaller side
    two = infoard.attention_loss([fs, fs], [ft, 3 * fs])  # second pair: same map up to scale -> adds 0
    assert torch.allclose(two, hand, atol=1e-7)


def test_defaults():
    a = infoard.get_args([])
    assert (a.weight_decay, a.lr, a.momentum, a.epochs, a.milestones, a.batch_size) == (2e-4, 0.1, 0.9, 200, [100, 150], 128)
    assert (a.steps, a.eps, a.alpha, a.teacher_epochs, a.teacher_arch) == (10, None, None, 200, "wrn-34-10")
    assert (a.asa, a.inner, a.w_kl, a.w_nce, a.w_at, a.nce_tau, a.nce_dim) == ("instance", "rslad", 1.0, 1.0, 1000.0, 0.07, 128)
    assert a.asa_range is None and a.at_stages is None and a.asa_gamma is None and a.asa_warmup == 10  # gamma: eps x 1.9/8, resolved by main
    assert infoard.method_name(a) == "infoard"
    base = infoard.get_args(["--asa", "off", "--mim", "logit"])
    assert (base.w_nce, base.w_at, base.w_kl) == (0, 0, 0.1)  # the RSLAD arm: only the KL, at RSLAD's scale
    assert infoard.method_name(base) == "rslad"
    assert infoard.method_name(infoard.get_args(["--asa", "off", "--mim", "logit", "--w-kl", "1"])) == "rslad-like-wkl1"
    assert infoard.method_name(infoard.get_args(["--asa", "off", "--mim", "logit", "--inner", "adaad"])) == "infoard"
    assert infoard.get_args(["--asa", "conf", "--mim", "logit"]).w_kl == 1.0
    assert infoard.get_args(["--mim", "logit+attention"]).w_nce == 0
    info = common.load_dataset("synthetic")[1]  # eps / alpha come from the dataset (common.Run fills them)
    assert (info.eps, info.alpha) == (8 / 255, 2 / 255)
    with pytest.raises(common.UserError, match="asa-range"):
        infoard.get_args(["--asa-range", "0.1", "0.05"])
    assert (a.asa_zero_misclassified, a.asa_apply, a.asa_probe) == (False, "next", "kl")
    for bad in (["--asa-beta", "0"], ["--asa-beta", "1.5"]):
        with pytest.raises(common.UserError, match="asa-beta"):
            infoard.get_args(bad)
    # the table holds unramped strengths: it must not move while the training eps ramps up
    with pytest.raises(common.UserError, match="asa-warmup"):
        infoard.get_args(["--dataset", "mnist", "--asa-warmup", "0"])  # MNIST ramps over 1 epoch
    assert infoard.get_args(["--dataset", "mnist", "--asa-warmup", "0", "--asa", "conf"]).asa_warmup == 0
    # 10 warm-up epochs of a paper-scale run; a short run (the CPU CIFAR-10 preset's 4 epochs) keeps half for ASA
    assert [infoard.get_args(["--epochs", str(e)]).asa_warmup for e in (1, 4, 30)] == [0, 2, 10]
    assert infoard.get_args(["--dataset", "mnist", "--epochs", "30"]).asa_warmup == 2  # MNIST's own entry
    assert infoard.get_args(["--epochs", "1", "--eps-warmup", "1"]).asa_warmup == 1  # never before the ramp ends


def test_teacher_frozen_student_and_heads_learn():
    student, teacher = tiny_pair()
    student.train()
    heads = infoard.ProjectionHeads(64, 128, 32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(5)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(10, (8,))
    opt = torch.optim.SGD(list(student.parameters()) + list(heads.parameters()), lr=0.5)
    for inner, asa in (("adaad", "conf"), ("rslad", "instance")):
        loss, logits = infoard.infoard_loss(student, teacher, heads, x, y, steps=2, asa=asa, inner=inner,
                                            table=torch.full((8,), EPS), idx=torch.arange(8))
        assert logits.shape == (8, 10) and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
        assert student.fc.weight.grad.abs().sum() > 0 and student.conv1.weight.grad.abs().sum() > 0
        opt.step()
        assert student.training and not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    with pytest.raises(AssertionError, match="eval mode"):  # a train-mode teacher would move its BN statistics
        infoard.infoard_loss(student, teacher.train(), heads, x, y, steps=0)
    teacher.eval()
    dtypes = []  # the projection heads run in float32 even under (CPU bf16) autocast
    handle = heads.student.register_forward_hook(lambda m, i, o: dtypes.append((i[0].dtype, o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert student(x).dtype == torch.bfloat16  # autocast really is on
        infoard.infoard_loss(student, teacher, heads, x, y, steps=0, asa="off", w_at=0)
    handle.remove()
    assert dtypes == [(torch.float32, torch.float32)]
    # each MIM term contributes: switching it off changes the loss by exactly that term
    torch.manual_seed(6)
    full, _ = infoard.infoard_loss(student.eval(), teacher, heads, x, y, steps=0, asa="off", w_at=0)
    torch.manual_seed(6)
    kl_only, _ = infoard.infoard_loss(student, teacher, heads, x, y, steps=0, asa="off", w_nce=0, w_at=0)
    zs, zt = heads(student(x, return_features=True)[1]["pooled"], teacher(x, return_features=True)[1]["pooled"])
    assert torch.allclose(full - kl_only, infoard.info_nce(zs, zt, 0.07), atol=1e-4)


def test_asa_off_logit_only_is_rslad():
    """--asa off --mim logit: RSLAD's attack (KL(T(x)||S(x')), 0.001 N(0,1) start, fixed eps) and its outer loss."""
    student, teacher = tiny_pair()
    student.train()
    torch.manual_seed(7)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(10, (8,))
    state = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(8)
    loss, logits = infoard.infoard_loss(student, teacher, None, x, y, steps=3, asa="off", w_nce=0, w_at=0)
    student.load_state_dict(state)  # train-mode forwards moved the BN statistics: start again from the same state
    torch.manual_seed(8)
    t_logits = teacher(x)
    student.eval()
    x_adv = common.pgd(student, x, y, EPS, 2 / 255, 3, loss="kl", target=F.softmax(t_logits, 1), random_start="normal")
    student.train()
    s_adv = student(x_adv)
    assert torch.allclose(logits, s_adv, atol=1e-5)
    assert torch.allclose(loss, infoard.rslad_kl(t_logits, s_adv, student(x)), atol=1e-5)


def small_synthetic(monkeypatch):
    full = common.synthetic_data
    monkeypatch.setattr(common, "synthetic_data", lambda: full(n_train=256, n_test=64))  # keep CPU time low


def test_end_to_end_teacher_distil_evaluate(tmp_path, monkeypatch, capsys):
    small_synthetic(monkeypatch)
    tiny = ["--dataset", "synthetic", "--device", "cpu", "--batch-size", "64", "--val-size", "32", "--steps", "2",
            "--epochs", "1", "--milestones", "1", "--arch", "wrn-10-1", "--teacher-arch", "wrn-10-2"]
    out = tmp_path / "infoard"
    best = infoard.main(tiny + ["--out-dir", str(out), "--asa-warmup", "1"])
    assert "--asa-warmup 1 >= --epochs 1: the strength table never moves" in capsys.readouterr().out  # said at the start
    teacher_path = str(out / "teacher" / "best.pt")
    tck = common.load_checkpoint(teacher_path)
    assert tck["arch"] == "wrn-10-2" and tck["method"] == "pgd-at"
    ck = common.load_checkpoint(best)
    assert ck["arch"] == "wrn-10-1" and ck["method"] == "infoard" and ck["temperature"] == 1.0
    fresh = common.build_model("wrn-10-1", 10).state_dict()
    assert set(ck["model"]) == set(fresh)  # exactly the student: no projection-head weights
    last = common.load_checkpoint(str(out / "last.pt"))
    assert set(last["extra"]["heads"]) == {"student.weight", "student.bias", "teacher.weight", "teacher.bias"}
    assert last["extra"]["heads"]["teacher.weight"].shape == (128, 128)  # wrn-10-2 pooled 128 -> 128
    report = evaluate.main([best, "--preset", "quick", "--n", "64", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert report["method"] == "infoard" and report["arch"] == "wrn-10-1"
    assert 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
    # --resume of a finished run reloads both stages (heads included) and trains nothing
    assert infoard.main(tiny + ["--out-dir", str(out), "--resume"]) == best
    assert last["extra"]["eps_table"]["eps"].shape == (256 - 32,)  # one eps_i per training image
    # the RSLAD baseline (--asa off --mim logit) from a TRADES teacher made by ltd.py: no heads, no table
    import ltd
    trades = ltd.main(tiny[:-2] + ["--no-distill", "--no-awp", "--steps", "1", "--out-dir", str(tmp_path / "trades")])
    base = infoard.main(tiny + ["--teacher", trades, "--asa", "off", "--mim", "logit",
                                "--out-dir", str(tmp_path / "rslad")])
    ck = common.load_checkpoint(base)
    assert ck["method"] == "rslad" and ck["args"]["w_kl"] == 0.1
    assert common.load_checkpoint(str(tmp_path / "rslad" / "last.pt"))["extra"] == {}
    # a stage index the models lack is a one-line UserError
    with pytest.raises(common.UserError, match="at-stages"):
        infoard.main(tiny + ["--teacher", teacher_path, "--at-stages", "3", "--out-dir", str(tmp_path / "bad")])


def test_strength_table_moves_logs_and_survives_resume(tmp_path, monkeypatch, capsys):
    small_synthetic(monkeypatch)
    tiny = ["--dataset", "synthetic", "--device", "cpu", "--batch-size", "64", "--val-size", "32", "--steps", "2",
            "--milestones", "1", "--arch", "wrn-10-1", "--mim", "logit", "--asa-warmup", "1", "--asa-beta", "0.5"]
    from tests.util import pgd_at
    teacher = pgd_at(["--dataset", "synthetic", "--device", "cpu", "--batch-size", "64", "--val-size", "32",
                      "--steps", "1", "--arch", "wrn-10-1", "--out-dir", str(tmp_path / "t")])
    out = tmp_path / "s"
    infoard.main(tiny + ["--teacher", teacher, "--epochs", "2", "--out-dir", str(out)])
    assert "never moves" not in capsys.readouterr().out
    table = common.load_checkpoint(str(out / "last.pt"))["extra"]["eps_table"]["eps"]
    with open(out / "log.jsonl") as f:
        logs = [json.loads(line) for line in f]
    assert logs[0]["eps_i_mean_255"] == pytest.approx(8) and logs[0]["eps_i_p90_255"] == pytest.approx(8)  # warm-up
    steps = (table - EPS) / (0.5 * 1.9 / 255)
    assert (table != EPS).any() and torch.allclose(steps, steps.round(), atol=1e-3)  # moved by beta x gamma
    assert steps.abs().max() <= 1 + 1e-3  # one visit per epoch after the warm-up epoch
    assert logs[1]["eps_i_mean_255"] == pytest.approx(table.mean().item() * 255, rel=1e-5)
    assert logs[1]["eps_i_p10_255"] <= logs[1]["eps_i_mean_255"] <= logs[1]["eps_i_p90_255"]
    seen = []  # --resume: the third epoch starts from the saved table, not from eps0
    loss_fn = infoard.infoard_loss
    monkeypatch.setattr(infoard, "infoard_loss", lambda *a, table=None, idx=None, **k: seen.append(
        (table[idx].clone(), idx.clone())) or loss_fn(*a, table=table, idx=idx, **k))
    infoard.main(tiny + ["--teacher", teacher, "--epochs", "3", "--out-dir", str(out), "--resume"])
    assert len(seen) == 3 and all(torch.equal(rows, table[idx]) for rows, idx in seen)
    # --asa conf under an eps ramp: its range [eps/2, 3 eps/2] ramps with the training eps
    ramp = []
    monkeypatch.setattr(infoard, "infoard_loss", lambda *a, **k: ramp.append((k["eps"], k["eps_range"])) or loss_fn(*a, **k))
    infoard.main(tiny + ["--teacher", teacher, "--epochs", "1", "--asa", "conf", "--eps-warmup", "1",
                         "--out-dir", str(tmp_path / "conf")])
    assert len(ramp) == 3 and ramp[0][0] < ramp[-1][0] == pytest.approx(EPS)
    assert all(r == pytest.approx((0.5 * e, 1.5 * e)) for e, r in ramp)


class Reached(Exception):
    pass


def test_stage_flags_are_checked_before_the_teacher_trains(tmp_path, monkeypatch):
    small_synthetic(monkeypatch)
    seen = []

    def train_teacher(run):  # stands in for the expensive stage: record the stages resolved before it
        seen.append(run.args.at_stages)
        raise Reached

    monkeypatch.setattr(infoard, "train_teacher", train_teacher)
    run = lambda arch, teacher_arch, *extra: infoard.main(
        ["--dataset", "synthetic", "--device", "cpu", "--val-size", "32", "--out-dir", str(tmp_path),
         "--arch", arch, "--teacher-arch", teacher_arch, *extra])
    with pytest.raises(common.UserError, match=r"--at-stages: stage indices \[0, 1, 2\]: the student has 2 stage maps"):
        run("papernot-cifar", "papernot-cifar", "--at-stages", "0", "1", "2")
    with pytest.raises(common.UserError, match=r"wrn depth must be 6n\+4"):  # a bad student arch: also before
        run("wrn-11-1", "papernot-cifar")
    assert seen == []  # refused before any training
    with pytest.raises(Reached):  # the default pairs what both models have
        run("papernot-cifar", "papernot-cifar")
    with pytest.raises(Reached):
        run("papernot-cifar", "wrn-10-1")
    with pytest.raises(Reached):
        run("wrn-10-1", "wrn-10-1")
    assert seen == [[0, 1], [0, 1], [0, 1, 2]]


def test_loss_defaults_fit_the_models(monkeypatch):
    """Without a strength table the attack uses the fixed eps; the default stages are those both models have."""
    torch.manual_seed(0)
    student, teacher = common.build_model("papernot-cifar", 10), common.build_model("papernot-cifar", 10).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(10, (4,))
    heads = infoard.ProjectionHeads(256, 256)
    calls = []
    attack = infoard.asa_attack
    monkeypatch.setattr(infoard, "asa_attack", lambda *a, **k: calls.append(a[8]) or attack(*a, **k))
    loss, logits = infoard.infoard_loss(student, teacher, heads, x, y, steps=1)
    assert torch.isfinite(loss) and logits.shape == (4, 10) and calls == ["off"]
    assert infoard.at_stage_indices(None, 4, 3) == [0, 1, 2] and infoard.at_stage_indices(None, 2, 4) == [0, 1]
    with pytest.raises(ValueError, match="the student has 2 stage maps, the teacher 2"):
        infoard.infoard_loss(student, teacher, heads, x, y, steps=1, at_stages=(0, 2))
