"""Reference equivalences: each reference is written here from its published algorithm (the TRADES, TRADES-AWP,
RSLAD and Attention Transfer papers and their official training loops, yaodongyu/TRADES trades.py,
csdongxian/AWP trades_AWP/, zibojia/RSLAD, szagoruyko/attention-transfer), and ours must give the same
adversarial examples, losses, weight perturbations, BatchNorm statistics and learning rates."""
import copy

import pytest
import torch
import torch.nn.functional as F

import at_alp
import common
import defensive_distillation as dd
import infoard
import ltd


def mnist_like(n=8, seed=0):
    """Saturated MNIST-like images: most pixels exactly 0, some exactly 1, the rest inside."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 1, 28, 28, generator=g)
    x = torch.where(u < 0.75, 0.0, torch.where(u > 0.9, 1.0, torch.rand(n, 1, 28, 28, generator=g)))
    return x, torch.randint(10, (n,), generator=g)


def bn_model(seed=0):
    """A small WideResNet: BatchNorm (so the forward order matters), no dropout."""
    torch.manual_seed(seed)
    return common.build_model("wrn-10-1", 10, 3, 16, (0.5,) * 3, (0.25,) * 3)


def dropout_model(seed=0):
    torch.manual_seed(seed)
    return common.build_model("papernot-mnist", 10)


def bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def reference_kl_attack(model, x, target_probs, eps, step, steps, clamp_start=False):
    """The TRADES / TRADES-AWP / RSLAD inner loop: start at x + 0.001 N(0, 1) (not clamped), ascend the summed
    KL(target || softmax(model(x'))) by sign steps, after each step project into the eps-ball, then into [0, 1]."""
    x_adv = x + 0.001 * torch.randn(x.shape)
    if clamp_start:  # not the references: only to show that the test can tell the difference
        x_adv = x_adv.clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), target_probs, reduction="sum")
        grad, = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.clamp(0.0, 1.0)


def test_trades_attack_starts_as_the_reference_on_saturated_images():
    model = dropout_model().eval()
    x, _ = mnist_like()
    with torch.no_grad():
        p_nat = F.softmax(model(x), 1)
    torch.manual_seed(1)
    ours = ltd.trades_attack(model, x, 0.3, 0.01, 10)
    torch.manual_seed(1)
    ref = reference_kl_attack(model, x, p_nat, 0.3, 0.01, 10)
    assert (ours - ref).abs().max() <= 1e-6
    # the test can tell: a start clamped into [0, 1] before the first gradient moves many saturated pixels
    torch.manual_seed(1)
    clamped = reference_kl_attack(model, x, p_nat, 0.3, 0.01, 10, clamp_start=True)
    assert ((clamped - ref).abs() > 1e-3).float().mean() > 0.05


def reference_trades_outer(model, x, x_adv, y, beta, order):
    """TRADES: CE(f(x), y) + beta / B * sum KL(softmax(f(x)) || softmax(f(x_adv))), all forwards in train mode.
    'trades': clean (CE), adv, clean (KL target); 'trades-awp': adv, clean (KL target), clean (CE)."""
    if order == "trades":
        z_ce = model(x)
        z_adv = model(x_adv)
        z_target = model(x)
    else:
        z_adv = model(x_adv)
        z_target = model(x)
        z_ce = model(x)
    robust = F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_target, 1), reduction="sum") / len(x)
    return F.cross_entropy(z_ce, y) + beta * robust


@pytest.mark.parametrize("order", ["trades", "trades-awp"])
@pytest.mark.parametrize("make", [dropout_model, bn_model])
def test_trades_outer_loss_and_one_sgd_step_equal_the_reference(order, make):
    """Same loss, same gradients, same weights and BatchNorm statistics after one SGD step, with dropout (two
    clean forwards, two masks, as the references) and with BatchNorm (the reference forward order)."""
    ours = make().train()
    ref = copy.deepcopy(ours)
    if make is dropout_model:
        x, y = mnist_like()
    else:
        torch.manual_seed(2)
        x, y = torch.rand(8, 3, 16, 16), torch.randint(10, (8,))
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    losses = []
    for model, fn in ((ours, lambda m: ltd.ltd_loss(m, x, x_adv, y, 6.0, bn_order=order)[0]),
                      (ref, lambda m: reference_trades_outer(m, x, x_adv, y, 6.0, order))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        torch.manual_seed(3)  # the same dropout masks, drawn in the same order
        loss = fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_batchnorm_statistics_follow_each_reference_forward_order():
    """Running statistics after one step: TRADES clean, adv, clean; TRADES-AWP adv, clean, clean; RSLAD adv, clean
    (the attacks run in eval mode and leave them alone)."""
    torch.manual_seed(4)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(10, (8,))
    x_adv = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    base = bn_model().train()

    def after(inputs):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for v in inputs:
                model(v)
        return bn_stats(model)

    def same(a, b):
        return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

    for order, inputs in (("trades", (x, x_adv, x)), ("trades-awp", (x_adv, x, x))):
        model = copy.deepcopy(base)
        ltd.ltd_loss(model, x, x_adv, y, bn_order=order)
        assert same(bn_stats(model), after(inputs)), order
    assert not same(after((x, x_adv, x)), after((x_adv, x, x)))  # the order is visible in the statistics
    # RSLAD (infoard.py --asa off --mim logit): its attack in eval mode, then adv, clean in train mode
    teacher = bn_model(seed=1).eval()
    model = copy.deepcopy(base)
    torch.manual_seed(5)
    infoard.infoard_loss(model, teacher, None, x, y, steps=3, asa="off", w_kl=0.1, w_nce=0, w_at=0)
    student = copy.deepcopy(base).eval()
    torch.manual_seed(5)
    x_rslad = reference_kl_attack(student, x, F.softmax(teacher(x), 1), 8 / 255, 2 / 255, 3)
    assert same(bn_stats(model), after((x_rslad, x)))
    assert not same(bn_stats(model), after((x, x_rslad)))


def test_rslad_attack_and_loss_equal_the_reference():
    """RSLAD: its KL attack from x + 0.001 N(0, 1), then 5/6 mean(kl(S(x'))) + 1/6 mean(kl(S(x))) over batch x
    classes with its kl(a, b) = -a b + log(b + 1e-5) b; ours (w_kl 0.1, batchmean) is that minus a term of the
    teacher alone."""
    teacher = bn_model(seed=1).eval()
    student = bn_model().train()
    ref = copy.deepcopy(student)
    torch.manual_seed(6)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(10, (8,))
    x[:, :, :4] = 0.0  # some saturated pixels
    torch.manual_seed(7)
    loss, _ = infoard.infoard_loss(student, teacher, None, x, y, steps=5, asa="off", w_kl=0.1, w_nce=0, w_at=0)
    loss.backward()
    with torch.no_grad():
        t_logits = teacher(x)
    b = F.softmax(t_logits, 1)
    ref.eval()
    torch.manual_seed(7)
    x_adv = reference_kl_attack(ref, x, b, 8 / 255, 2 / 255, 5)
    ref.train()
    kl = lambda logits: (-F.log_softmax(logits, 1) * b + torch.log(b + 1e-5) * b).mean()
    ref_loss = 5 / 6 * kl(ref(x_adv)) + 1 / 6 * kl(ref(x))
    ref_loss.backward()
    teacher_only = (b * (torch.log(b + 1e-5) - torch.log(b))).mean()  # constant: no gradient to the student
    assert loss.item() == pytest.approx(ref_loss.item() - teacher_only.item(), rel=1e-5)
    for (k, p), q in zip(student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=k)


def test_awp_layerwise_step_equals_the_reference():
    """AWP: one SGD ascent step of a proxy on CE + beta KL (clean, adv, clean forwards in train mode), the change
    rescaled per weight tensor to |w| / |change|, times gamma; biases and 1-d tensors stay (float64)."""
    torch.set_default_dtype(torch.float64)
    try:
        model = dropout_model().double().train()
        x, y = mnist_like()
        x, x_adv = x.double(), (x.double() + 0.1 * torch.randn(x.shape)).clamp(0, 1)
        ref = copy.deepcopy(model)
        torch.manual_seed(8)
        loss_fn = lambda m: ltd.ltd_loss(m, x, x_adv, y, 6.0, bn_order=None)[0]  # AWP's proxy loss
        saved = ltd.awp_perturb(model, copy.deepcopy(model), loss_fn, 5e-3)
        proxy = copy.deepcopy(ref).train()
        torch.manual_seed(8)
        logits = proxy(x)
        robust = F.kl_div(F.log_softmax(proxy(x_adv), 1), F.softmax(proxy(x), 1), reduction="batchmean")
        ascent = -(F.cross_entropy(logits, y) + 6.0 * robust)
        step = torch.optim.SGD(proxy.parameters(), lr=0.01)
        step.zero_grad()
        ascent.backward()
        step.step()
        new = dict(proxy.named_parameters())
        with torch.no_grad():
            for name, w in ref.named_parameters():
                if w.dim() > 1:
                    diff = new[name] - w
                    w.add_(5e-3 * w.norm() / (diff.norm() + 1e-20) * diff)
        for (k, a), b in zip(model.named_parameters(), ref.parameters()):
            if k in saved:  # v = w_after - w_before agrees to float32 rounding (our loss runs in float32)
                assert (a - b).norm() / (b - saved[k]).norm() < 1e-5, k
            else:
                assert torch.equal(a, b), k  # biases stay put
        assert set(saved) == {k for k, w in model.named_parameters() if w.dim() > 1}
    finally:
        torch.set_default_dtype(torch.float32)


def test_attention_transfer_equals_the_reference():
    """at(A) = normalise(vec(mean_c A^2)); at_loss = mean over batch and positions of (at(A) - at(B))^2."""
    torch.manual_seed(9)
    pairs = [(torch.randn(4, c, s, s), torch.randn(4, c, s, s)) for c, s in ((8, 16), (16, 8), (32, 4))]

    def at(a):
        v = a.pow(2).mean(1).view(a.size(0), -1)
        return v / v.norm(dim=1, keepdim=True)

    ref = sum((at(a) - at(b)).pow(2).mean() for a, b in pairs)
    for a, _ in pairs:
        torch.testing.assert_close(common.attention_map(a), at(a), rtol=1e-6, atol=1e-7)
    stages_a, stages_b = [a for a, _ in pairs], [b for _, b in pairs]
    torch.testing.assert_close(at_alp.attention_pairing_loss(stages_a, stages_b), ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(infoard.attention_loss(stages_a, stages_b), ref, rtol=1e-6, atol=1e-9)


def lr_per_epoch(args, epochs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = common.make_schedule(opt, args.schedule, epochs, 1, args.milestones, args.gamma)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_learning_rate_schedules_count_epochs_as_the_references():
    """TRADES-AWP: `lr = 0.1, x0.1 if epoch >= 100, x0.1 if epoch >= 150` for 1-based epochs; ARD (InfoARD's
    200 epochs): x0.1 when the 0-based epoch reaches 100, 150; lengstrom's DD: 0.5^floor(epoch/10), 0-based."""
    trades_awp = [0.1 * (0.1 if e >= 100 else 1) * (0.1 if e >= 150 else 1) for e in range(1, 201)]
    assert lr_per_epoch(ltd.get_args([]), 200) == pytest.approx(trades_awp)
    ard = [0.1 * (0.1 if e >= 100 else 1) * (0.1 if e >= 150 else 1) for e in range(200)]
    assert lr_per_epoch(infoard.get_args([]), 200) == pytest.approx(ard)
    a = dd.get_args(["--dataset", "cifar10"])
    assert lr_per_epoch(a, 50) == pytest.approx([1e-3 * 0.5 ** (e // 10) for e in range(50)])
