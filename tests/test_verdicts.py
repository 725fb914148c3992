"""evaluate.py's verdicts: exact binomial tails, Wilson intervals, the paired masking tests on simulated per-image
outcomes (they must not flip with the number of images), models that cannot be judged, and the report plumbing
(intervals, atomic JSON, --diagnose batches, the official AutoAttack's seed and targets)."""
import argparse
import math
import os
import types
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import evaluate


# ------------------------------------------------------------------------------- binomial tails
def exact_tail(k, n, p):
    """P[Bin(n, p) >= k] in exact rational arithmetic (p a Fraction)."""
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1)))


def test_binom_tail_known_values():
    tail = evaluate.binom_tail
    assert tail(8, 10, 0.5) == pytest.approx(56 / 1024, rel=1e-12)        # 45 + 10 + 1 of 2^10
    assert tail(15, 20, 0.5) == pytest.approx(21700 / 2 ** 20, rel=1e-12)  # 15504 + 4845 + 1140 + 190 + 20 + 1
    assert tail(12, 12, 2 / 3) == pytest.approx((2 / 3) ** 12, rel=1e-12)
    assert tail(190, 191, 0.5) == pytest.approx(192 / 2 ** 191, rel=1e-9)  # DD: far below any float's 1 - p
    assert tail(1, 10, 0.01) == pytest.approx(1 - 0.99 ** 10, rel=1e-12)
    assert tail(0, 5, 0.3) == 1.0 and tail(-1, 5, 0.3) == 1.0 and tail(6, 5, 0.3) == 0.0
    assert tail(1, 5, 0.0) == 0.0 and tail(5, 5, 1.0) == 1.0 and tail(0, 0, 0.5) == 1.0


@pytest.mark.parametrize("n,p", [(7, "1/3"), (50, "1/2"), (60, "1/4"), (300, "2/3"), (400, "1/100")])
def test_binom_tail_matches_exact_rational_arithmetic(n, p):
    p = Fraction(p)
    for k in sorted({0, 1, n // 4, n // 3, n // 2, 2 * n // 3, n - 1, n}):
        assert evaluate.binom_tail(k, n, float(p)) == pytest.approx(exact_tail(k, n, p), rel=1e-9, abs=1e-300), (k, n, p)


def test_wilson_interval_known_values():
    assert evaluate.format_accuracy(156, 500) == "31.2% [27.3, 35.4], 156/500"
    lo, hi = evaluate.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = evaluate.wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = evaluate.wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert evaluate.wilson_interval(0, 0) == (0.0, 1.0)


# ----------------------------------------------------------- simulated per-image outcome vectors
def outcomes(n, seed, clean, ce, q, fgsm_extra=0.03, pgd100_extra=0.01, square_wb=0.002, survive_margin=0.02):
    """Paired per-image outcomes of the diagnostics (True = still classified correctly): clean accuracy
    `clean`, PGD-20 on CE leaves `ce` of all images, the margin attack breaks a share q of those (and lets a
    few CE-broken ones survive), FGSM is weaker than PGD-20, PGD-100 a little stronger, Square breaks a share
    `square_wb` of what every white-box attack left."""
    g = np.random.default_rng(seed)
    u = lambda: g.random(n)
    ok_clean = u() < clean
    ok20 = ok_clean & (u() < ce / clean)
    cw = np.where(ok20, u() >= q, u() < survive_margin) & ok_clean
    fgsm = ok20 | (ok_clean & (u() < fgsm_extra))
    pgd100 = (ok20 & (u() >= pgd100_extra)) | (ok_clean & ~ok20 & (u() < pgd100_extra / 4))
    wb = fgsm & ok20 & pgd100 & cw
    square = ok_clean & ~(wb & (u() < square_wb)) & (u() < 0.999)
    t = lambda a: torch.from_numpy(a)
    return {"clean": t(ok_clean), "fgsm": t(fgsm), "pgd20": t(ok20), "pgd100": t(pgd100), "cw": t(cw), "square": t(square)}


SCENARIOS = {  # name: (clean, CE-robust, q), flagged?
    "honest CIFAR-10-like PGD-AT (CE 52%, q 0.05)": ((0.85, 0.52, 0.05), False),
    "MNIST small-budget AT (CE 30%, q 0.37)": ((0.94, 0.30, 0.37), False),
    "defensive distillation (CE 95%, margin ~0%)": ((0.97, 0.95, 0.998), True),
    "low-robustness masking (CE 8%, margin 0%)": ((0.95, 0.08, 1.0), True),
}


@pytest.mark.parametrize("n", [200, 2000])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ce_vs_margin_verdict_holds_at_200_and_2000_images(scenario, n):
    (clean, ce, q), flagged = SCENARIOS[scenario]
    for seed in range(20):
        ok = outcomes(n, seed, clean, ce, q)
        stats, reasons = evaluate.masking_checks(ok, dlr_in_cascade=True)
        t = stats["ce_vs_margin"]
        assert t["R"] == int((ok["clean"] & ok["pgd20"]).sum()) and t["b"] == int((ok["clean"] & ok["pgd20"] & ~ok["cw"]).sum())
        if flagged:
            assert t["p"] < 0.01 and len(reasons) == 1 and reasons[0].startswith("CE-vs-margin"), (seed, t, reasons)
            assert "overstates robustness" in reasons[0] and "AA-lite's DLR loss (APGD-T) is not affected" in reasons[0]
        else:
            assert reasons == [], (seed, t, reasons)  # and no other check fires on these honest outcomes


def test_dd_is_flagged_with_only_a_dozen_ce_robust_images():
    ok = {k: torch.ones(13, dtype=torch.bool) for k in ("clean", "fgsm", "pgd20", "pgd100", "cw", "square")}
    ok["pgd20"][12] = ok["pgd100"][12] = ok["fgsm"][12] = False  # CE-PGD leaves 12 images robust ...
    ok["cw"][:] = ok["square"][:] = False  # ... and the margin attack breaks every one of them
    stats, reasons = evaluate.masking_checks(ok)
    assert stats["ce_vs_margin"]["R"] == 12 and stats["ce_vs_margin"]["b"] == 12
    assert reasons and "every image CE leaves robust" in reasons[0]
    # the old absolute-gap rule's blind spot: robust accuracy 8% -> 0% is only 8 points
    stats, reasons = evaluate.masking_checks(outcomes(200, 1, 0.95, 0.08, 1.0))
    assert 8 <= stats["ce_vs_margin"]["R"] and reasons


def test_ce_vs_margin_words_the_overstatement():
    ok = {k: torch.ones(100, dtype=torch.bool) for k in ("clean", "fgsm", "pgd20", "pgd100", "cw", "square")}
    ok["cw"][:80] = False  # the margin attack breaks 80 of the 100 images CE leaves: CE overstates 100/20 = 5x
    stats, reasons = evaluate.masking_checks(ok)
    assert (stats["ce_vs_margin"]["b"], stats["ce_vs_margin"]["share"]) == (80, 0.8)
    assert "cross-entropy overstates robustness about 5.0x" in reasons[0] and "DLR" not in reasons[0]


def test_fgsm_pgd100_and_square_checks_are_paired_tests():
    base = lambda: {k: torch.ones(1000, dtype=torch.bool) for k in ("clean", "fgsm", "pgd20", "pgd100", "cw", "square")}
    ok = base()
    ok["pgd20"][:300] = ok["cw"][:300] = ok["pgd100"][:300] = ok["fgsm"][:300] = False
    ok["fgsm"][300:330] = False  # FGSM also breaks 30 images PGD-20 leaves: 3 points, significant
    stats, reasons = evaluate.masking_checks(ok)
    assert (stats["fgsm_beats_pgd20"]["a_only"], stats["fgsm_beats_pgd20"]["b_only"]) == (30, 0)
    assert stats["fgsm_beats_pgd20"]["significant"] and any(r.startswith("single-step FGSM") for r in reasons)
    ok["fgsm"][315:330] = True
    ok["fgsm"][:8] = True  # 15 one way, 8 the other: noise (p = 0.1)
    stats, reasons = evaluate.masking_checks(ok)
    assert not stats["fgsm_beats_pgd20"]["significant"] and reasons == []
    ok = base()
    ok["fgsm"][:9] = False  # 9 to 0: p = 0.002, but under the 1-point minimum effect on 1000 images
    stats, reasons = evaluate.masking_checks(ok)
    assert stats["fgsm_beats_pgd20"]["p"] < 0.01 and not stats["fgsm_beats_pgd20"]["significant"] and reasons == []
    ok = base()
    ok["pgd20"][:50] = False  # PGD-100 leaves 50 images that PGD-20 broke
    stats, reasons = evaluate.masking_checks(ok)
    assert stats["pgd100_loses_to_pgd20"]["significant"] and any(r.startswith("more PGD steps") for r in reasons)
    # Square: a rate among the white-box-robust images, not an absolute count
    ok = base()
    ok["square"][:3] = False  # 3 of 1000 (0.3%): the old rule's ">= 3 images" alarm, here within 1%
    stats, reasons = evaluate.masking_checks(ok)
    assert stats["square_among_white_box_robust"]["R"] == 1000 and reasons == []
    ok["white_box"] = torch.zeros(1000, dtype=torch.bool)
    ok["white_box"][:20] = True  # the evaluation's AA-lite left only 20 robust: 3 of those 20 is a lot
    stats, reasons = evaluate.masking_checks(ok)
    assert stats["square_among_white_box_robust"]["R"] == 20 and any(r.startswith("black-box Square") for r in reasons)


def test_apgd_t_hint_is_scale_free_on_simulated_cascades():
    g = np.random.default_rng(0)
    for n in (200, 2000, 10000):
        for q, hint in ((0.05, False), (0.5, True)):  # honest CIFAR-like; TRADES-family MNIST at a small budget
            fired = 0
            for _ in range(10):
                after_ce = int((g.random(n) < 0.5).sum())
                after_t = after_ce - int((g.random(after_ce) < q).sum())
                fired += bool(evaluate.cascade_warnings(["apgd-ce", "apgd-t"], {"apgd-ce": after_ce, "apgd-t": after_t}, n))
            assert fired == (10 if hint else 0), (n, q, fired)


# ------------------------------------------------------------------------ models that cannot be judged
class Constant(nn.Module):
    """The same logits for every image (class 0 wins; all NaN with scale nan): at chance, zero input gradients."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return (x.flatten(1)[:, :1] * 0 + torch.tensor([1.0] + [0.0] * 9)) * self.scale


def test_a_chance_or_nan_model_is_neither_robust_nor_masked():
    x, y = torch.rand(60, 3, 8, 8), torch.arange(60) % 10
    chance = evaluate.diagnose(Constant(), x, y, 0.03, 0.01, 10, evaluate.contextlib.nullcontext, square_queries=10)
    assert chance["judged"] is False and chance["masking_suspected"] is None
    assert chance["verdict"].startswith("model has not learned: clean accuracy 10.0% [")  # not "masking suspected"
    nan = evaluate.diagnose(Constant(float("nan")), x, y, 0.03, 0.01, 10, evaluate.contextlib.nullcontext)
    assert nan["judged"] is False and nan["masking_suspected"] is None
    assert nan["verdict"].startswith("non-finite outputs:") and "60 of 60" in nan["verdict"]
    assert evaluate.not_learned(19, 100, 10) and not evaluate.not_learned(20, 100, 10)
    assert evaluate.not_learned(74, 100, 2) and not evaluate.not_learned(75, 100, 2)
    # on 20 images a chance model gets 6 right one time in 90 (30%, over twice chance): still not judged
    assert evaluate.not_learned(6, 20, 10) and not evaluate.not_learned(7, 20, 10)


# ----------------------------------------------------------------------------- the report plumbing
def test_diagnose_honours_the_batch_size():
    sizes = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 8 * 8, 10)

        def forward(self, x):
            sizes.append(len(x))
            return self.lin(x.flatten(1)) * 5

    torch.manual_seed(0)
    model = Recording()
    x = torch.rand(30, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    sizes.clear()
    d = evaluate.diagnose(model, x, y, 0.02, 0.005, 10, evaluate.contextlib.nullcontext, square_queries=5, batch_size=7)
    assert d["judged"] and d["counts"]["clean"] == 30 and max(sizes) == 7


class FakeAutoAttack:
    """Stands in for the official class: records its seed and target counts, breaks nothing."""
    made = []

    def __init__(self, model, norm, eps, version, device, seed=None):
        self.seed = seed
        self.apgd_targeted, self.fab = types.SimpleNamespace(n_target_classes=9), types.SimpleNamespace(n_target_classes=9)
        FakeAutoAttack.made.append(self)

    def run_standard_evaluation(self, x, y, bs=250):
        return x.clone()


def test_official_autoattack_gets_the_seed_and_fewer_targets_on_few_classes(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "official_autoattack", lambda: FakeAutoAttack)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x, y = torch.rand(6, 3, 4, 4), torch.zeros(6, dtype=torch.long)
    evaluate.run_attack("autoattack", model, x, y, 0.03, 0.01, seed=7)
    aa = FakeAutoAttack.made[-1]
    assert aa.seed == 7 and aa.apgd_targeted.n_target_classes == 4 and aa.fab.n_target_classes == 4
    # 3 classes: the official APGD-T cannot run at all; skipped and said so, as our apgd-t
    from PIL import Image
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for ci, c in enumerate("abc"):
            os.makedirs(tree / split / c)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 60 * ci + 9 * i, np.uint8)).save(tree / split / c / f"{i}.png")
    torch.manual_seed(0)
    path = str(tmp_path / "m.pt")
    torch.save(common.make_checkpoint(common.build_model("wrn-10-1", 3, 3, 8),
                                      argparse.Namespace(arch="wrn-10-1", dataset="folder", data_dir=str(tree)),
                                      types.SimpleNamespace(num_classes=3, channels=3, size=8), "test", 0, {}), path)
    made = len(FakeAutoAttack.made)
    report = evaluate.main([path, "--attacks", "fgsm,autoattack", "--device", "cpu", "--quiet", "--json",
                            str(tmp_path / "r.json")])
    assert len(FakeAutoAttack.made) == made and "4+ classes" in report["skipped"]["autoattack"]
    assert [a["name"] for a in report["attacks"]] == ["fgsm"] and "autoattack skipped" in report["protocol"]


def test_a_chance_model_end_to_end_says_so(tmp_path, capsys):
    torch.manual_seed(0)
    model = common.build_model("wrn-10-1", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):  # equal logits: every image is called class 0, chance on 10 classes
                m.weight.zero_(), m.bias.zero_()
    path = str(tmp_path / "m.pt")
    torch.save(common.make_checkpoint(model, argparse.Namespace(arch="wrn-10-1", dataset="synthetic", data_dir="."),
                                      types.SimpleNamespace(num_classes=10, channels=3, size=32), "test", 0, {}), path)
    report = evaluate.main([path, "--attacks", "fgsm", "--n", "50", "--device", "cpu", "--quiet", "--diagnose",
                            "--diagnose-n", "20", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert report["clean_acc"] < 0.2
    assert report["warnings"][0].startswith("warning: model has not learned")
    assert report["diagnostics"]["verdict"].startswith("model has not learned")
    assert report["diagnostics"]["masking_suspected"] is None
    assert out.splitlines()[-1].endswith("(not meaningful: the model has not learned)")


# --------------------------------------------------------------------- against the official code
@pytest.mark.skipif(evaluate.official_autoattack() is None, reason="the official AutoAttack package is not installed")
def test_exact_mode_agrees_with_the_official_autoattack_on_every_image():
    from tests import compare_autoattack as cmp
    from tests.util import train_small_cnn
    net, x, y = train_small_cnn()
    x, y, eps = x[:64], y[:64], 3 / 255
    with evaluate.strict_float32():
        ours = cmp.ours_exact(net, x, y, eps, 24)  # several batches of the official code's kind
        official = cmp.official(net, x, y, eps, 24, 10)
    assert torch.equal(ours, official), int((ours != official).sum())
    assert 0 < int(ours.sum()) < int(cmp.robust_mask(net, x, y, 24).sum())  # the attacks broke some, not all
