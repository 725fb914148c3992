"""Tests for defensive_distillation.py: the losses against hand computations, the logit blow-up that the
method causes, and the end-to-end pipeline (two stages -> two checkpoints -> evaluate.py flags masking)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import defensive_distillation as dd
import evaluate
from tests.util import torch_threads

# Adam is immune to the 1/T gradient scale, so at T = 100 it grows T-fold logits within ~300 CPU steps
# (SGD needs epochs of real data for that, see the method's docstring); the one-cycle warm-up keeps early
# Adam steps from killing this small ReLU net. papernot-mnist is common's cheapest arch. With seeds 0-3 this
# gives teachers at 86-100% and students at 44-72% validation accuracy (chance: 10%), logits ~170-270.
FAST = ["--dataset", "synthetic", "--arch", "papernot-mnist", "--device", "cpu", "--batch-size", "32",
        "--val-size", "64", "--optimizer", "adam", "--lr", "5e-3", "--schedule", "onecycle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """The full pipeline at the paper's T = 100: (deployed checkpoint path, out_dir)."""
    out = tmp_path_factory.mktemp("dd_t100")
    return dd.main(FAST + ["--teacher-epochs", "12", "--epochs", "10", "--out-dir", str(out)]), out


def test_losses_match_hand_computation():
    ident = lambda z: z  # the "model" returns its input, so the logits are chosen by hand
    # stage 1: z = (0, T ln 3) at T: softmax(z / T) = (1/4, 3/4); CE for y = 1 is -ln(3/4), for y = 0 -ln(1/4)
    for T in (1.0, 100.0):
        z = torch.tensor([[0.0, T * math.log(3)], [0.0, T * math.log(3)]])
        loss, logits = dd.temperature_ce_loss(ident, z, torch.tensor([1, 0]), T)
        assert loss.item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, abs=1e-6)
        assert logits is z
    # stage 2: q = softmax(z / T) = (1/4, 3/4), soft label p = (1/2, 1/2): -(1/2 ln 1/4 + 1/2 ln 3/4)
    p = torch.tensor([[0.5, 0.5]])
    for T in (1.0, 100.0):
        z = torch.tensor([[0.0, T * math.log(3)]])
        assert dd.distillation_loss(ident, z, p, T)[0].item() == pytest.approx(
            -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), abs=1e-6)
    # one-hot soft labels turn stage 2 into stage 1 (a check that can tell the losses apart otherwise)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 5, generator=g) * 30, torch.tensor([0, 1, 2, 3, 4, 0])
    one_hot = dd.distillation_loss(ident, z, F.one_hot(y, 5).float(), 20.0)[0]
    assert one_hot.item() == pytest.approx(dd.temperature_ce_loss(ident, z, y, 20.0)[0].item(), rel=1e-5)
    assert one_hot.item() != pytest.approx(dd.temperature_ce_loss(ident, z, y, 1.0)[0].item(), rel=1e-2)


def test_soft_label_loss_at_t1_is_knowledge_distillation():
    """At T = 1 the soft-label CE is Hinton's KD loss KL(p || softmax(z)) (T^2 = 1) plus the constant entropy
    of p: the same value up to H(p), computed by hand, and exactly the same gradient."""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(4, 6, generator=g) * 3).requires_grad_(True)
    p = F.softmax(torch.randn(4, 6, generator=g) * 2, 1)
    ours, _ = dd.distillation_loss(lambda v: v, z, p, 1.0)
    kd = F.kl_div(F.log_softmax(z, 1), p, reduction="batchmean")  # ordinary KD at T = 1
    entropy = sum(-pi * math.log(pi) for row in p.tolist() for pi in row) / len(p)
    assert ours.item() == pytest.approx(kd.item() + entropy, abs=1e-5)
    assert entropy > 0.1  # so the check above can fail if the loss were plain KL
    g_ours, = torch.autograd.grad(ours, z)
    g_kd, = torch.autograd.grad(kd, z)
    assert torch.allclose(g_ours, g_kd, atol=1e-6)
    assert torch.allclose(g_ours, (F.softmax(z, 1) - p).detach() / len(p), atol=1e-6)  # d/dz = (q - p) / B


def test_soft_labels_use_eval_mode_and_restore_it():
    torch.manual_seed(0)
    teacher = common.build_model("papernot-mnist", 10, 3, 32, (0.5,) * 3, (0.25,) * 3).train()
    x = torch.rand(8, 3, 32, 32)
    p1, p2 = dd.soft_labels(teacher, x, 0.01), dd.soft_labels(teacher, x, 0.01)
    assert teacher.training  # mode restored
    assert torch.equal(p1, p2)  # dropout off: deterministic
    with torch.no_grad():
        want = F.softmax(teacher.eval()(x) / 0.01, 1)
        train_out = F.softmax(teacher.train()(x) / 0.01, 1)
    assert torch.allclose(p1, want, atol=1e-6) and p1.dtype == torch.float32
    assert not torch.allclose(p1, train_out, atol=1e-3)  # with dropout on it would differ
    assert torch.allclose(p1.sum(1), torch.ones(8), atol=1e-5) and not p1.requires_grad


def _mean_abs_logit(model, x):
    with torch.no_grad():
        return model(x).abs().mean().item()


def _zero_grad_share(model, x, y):
    """Share of images whose float32 CE input-gradient is exactly zero (the saturation signature)."""
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x).float(), y, reduction="sum"), x)
    return (grad.flatten(1).abs().amax(1) == 0).float().mean().item()


def _fit(loss_fn, arch, info, x, y, steps, lr, seed=0):
    """A plain in-memory training loop (no augmentation) around one of the method's losses."""
    torch.manual_seed(seed)
    m = common.model_for(arch, info)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(y), (64,), generator=g)
        loss, _ = loss_fn(m, x[i], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_distilled_logits_dwarf_a_t1_model(distilled):
    (xtr, ytr), info = common.load_dataset("synthetic", train=True)
    (xs, ys), _ = common.load_dataset("synthetic", train=False)
    x, y = xs[:128].float() / 255, ys[:128]
    dist_model, ck = common.build_model_from_checkpoint(distilled[0])
    assert ck["temperature"] == 1.0  # deployed on raw logits
    # an ordinary T = 1 network of the same arch, trained to fit the data (chance is 10%)
    plain = _fit(lambda m, xb, yb: dd.temperature_ce_loss(m, xb, yb, 1.0), "papernot-mnist", info,
                 xtr.float() / 255, ytr, 60, 1e-3)
    assert _accuracy(plain, x, y) > 0.9 and _accuracy(dist_model, x, y) > 0.3
    big, small = _mean_abs_logit(dist_model, x), _mean_abs_logit(plain, x)
    assert big > 10 * small, (big, small)
    # the consequence: exactly-zero CE input gradients for the distilled model, none for the plain one
    zero_d, zero_p = _zero_grad_share(dist_model, x, y), _zero_grad_share(plain, x, y)
    assert zero_d > 0.05 and zero_p == 0.0, (zero_d, zero_p)


def test_end_to_end_two_checkpoints_and_masking_is_flagged(distilled, tmp_path):
    path, out = distilled
    teacher_path = os.path.join(out, "teacher", "best.pt")
    assert path == os.path.join(out, "best.pt") and os.path.isfile(path) and os.path.isfile(teacher_path)
    ck_d, ck_t = common.load_checkpoint(path), common.load_checkpoint(teacher_path)
    assert ck_d["temperature"] == 1.0 and ck_t["temperature"] == 100.0  # F_d deployed at T=1; F as trained
    assert ck_d["method"] == "defensive_distillation" and ck_t["method"] == "defensive_distillation-teacher"
    report = evaluate.main([path, "--preset", "quick", "--n", "32", "--batch-size", "32", "--device", "cpu",
                            "--diagnose", "--square-queries", "50", "--json", str(tmp_path / "r.json")])
    assert report["temperature"] == 1.0 and report["method"] == "defensive_distillation"
    assert report["clean_acc"] > 0.3
    d = report["diagnostics"]
    assert d["masking_suspected"], d["verdict"]
    assert d["mean_abs_logit"] > 50 and d["zero_grad_share"] > 0.05
    # the margin attack does what the CE attack cannot (a T = 1 model shows no such gap)
    assert d["acc_pgd20_cw"] < d["acc_pgd20_ce"] - 0.1, (d["acc_pgd20_ce"], d["acc_pgd20_cw"])


def test_teacher_reuse_and_mismatch(distilled, tmp_path, capsys):
    _, out = distilled
    teacher_path = os.path.join(out, "teacher", "best.pt")
    path = dd.main(FAST + ["--epochs", "1", "--teacher", teacher_path, "--out-dir", str(tmp_path / "reuse")])
    assert os.path.isfile(path) and not os.path.exists(tmp_path / "reuse" / "teacher")  # stage 1 skipped
    ck = common.load_checkpoint(teacher_path)
    for dataset, classes in (("cifar100", 100), ("mnist", 10)):
        ck["dataset"], ck["num_classes"] = dataset, classes
        torch.save(ck, tmp_path / "foreign.pt")
        with pytest.raises(common.UserError, match=f"teacher .* is for {dataset}"):
            dd.main(FAST + ["--teacher", str(tmp_path / "foreign.pt"), "--out-dir", str(tmp_path / "x")])


def test_stalled_training_warns(tmp_path, capsys):
    dd.main(FAST + ["--optimizer", "sgd", "--lr", "1e-6", "--epochs", "1", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("near log(10)") == 2 and "or --optimizer adam" in out  # once per stage, with SGD's advice
    path = tmp_path / "best.pt"  # the closing hint: a CPU evaluation with a few masking checks, about a minute
    assert f"evaluate it: python evaluate.py {path} --preset quick --n 200 --diagnose --diagnose-n 16 " \
           f"--square-queries 100" in out


def test_bad_flags():
    with pytest.raises(common.UserError, match="temperature"):
        dd.get_args(["--temperature", "0"])
    with pytest.raises(common.UserError, match="nesterov"):
        dd.get_args(["--optimizer", "sgd", "--nesterov", "--momentum", "0"])
    a = dd.get_args(["--dataset", "mnist"])
    assert (a.arch, a.temperature, a.epochs, a.teacher_epochs, a.batch_size, a.schedule, a.optimizer, a.lr) == \
        ("papernot-mnist", 100.0, 50, 50, 128, "constant", "adam", 1e-3)
    assert dd.get_args(["--dataset", "cifar10"]).arch == "papernot-cifar"


def test_help_shows_the_milestone_rule_and_no_eps_ramp(capsys):
    with pytest.raises(SystemExit):
        dd.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: every 10 epochs, 10 20 ...)" in text and "mnist: None" not in text
    assert "--eps-warmup" not in text  # no attack is trained here
    a, m = dd.get_args(["--dataset", "cifar10", "--epochs", "35"]), dd.get_args(["--dataset", "mnist"])
    assert (a.milestones, a.eps_warmup, m.eps_warmup) == ([10, 20, 30], 0, 0)


def test_not_learning_needs_chance_loss_and_chance_validation():
    # a first CIFAR-10 epoch that starts at chance and learns: mean loss 2.11 (> 0.9 log 10), 36.6% validation
    assert not dd.not_learning({"loss": 2.11, "val_clean": 0.366}, 10)
    assert dd.not_learning({"loss": 2.30, "val_clean": 0.11}, 10)  # stuck at the uniform prediction
    assert not dd.not_learning({"loss": 1.2, "val_clean": 0.11}, 10)
