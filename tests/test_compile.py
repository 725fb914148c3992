"""--compile gives the same training loss as the default path; the speed benchmark runs and reports.

The compile test uses torch.compile's default backend (inductor), as the scripts do. On the CPU inductor
builds C++ kernels: a project model (wrn-10-1) takes ~45 s to compile on 2 cores, so the CPU run uses a
tiny BN-free CNN (~15 s); on a GPU it takes wrn-10-1 under bf16 autocast.
"""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from tests import bench

CUDA = torch.cuda.is_available()


def pgd_at_loss_and_grads(model, train_model, run, x, y):
    """The scripts' PGD-AT step up to backward: (loss, x_adv, gradients of the parameters)."""
    model.eval()
    with run.autocast():
        x_adv = common.pgd(train_model, x, y, 8 / 255, 2 / 255, 3, random_start=False)
    model.train()
    with run.autocast():
        loss = F.cross_entropy(train_model(x_adv).float(), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), x_adv, [p.grad.float().clone() for p in model.parameters()]


def test_compile_gives_the_default_paths_loss(tmp_path):
    device = "cuda" if CUDA else "cpu"
    args = common.base_parser("compile", epochs=1).parse_args(
        ["--dataset", "synthetic", "--device", device, "--compile", "--val-size", "64", "--out-dir", str(tmp_path)])
    run = common.Run(args, "compile-test")
    torch.manual_seed(0)
    if CUDA:
        model = run.model("wrn-10-1")
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).to(device)
    x, y = next(iter(run.train_loader))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        eager = pgd_at_loss_and_grads(model, model, run, x, y)
        compiled_model = run.prepare(model)
        assert common.unwrap(compiled_model) is model and compiled_model is not model
        compiled = pgd_at_loss_and_grads(model, compiled_model, run, x, y)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled, not just wrapped
    finally:
        torch._dynamo.reset()
    tol = dict(rtol=2e-2, atol=2e-2) if run.amp else dict(rtol=1e-3, atol=1e-5)  # bf16 on GPU, fp32 on CPU
    assert eager[0] == pytest.approx(compiled[0], rel=tol["rtol"])
    # The attack may flip the sign of a near-zero gradient entry: a handful of pixels may differ.
    assert ((eager[1] - compiled[1]).abs() > 1e-5).float().mean() < (0.1 if run.amp else 0.01)
    for a, b in zip(eager[2], compiled[2]):
        torch.testing.assert_close(b, a, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


def test_bench_smoke_reports_consistent_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--device", "cpu", "--archs", "wrn-10-1", "--n", "48", "--batch-size", "16",
                       "--steps-measured", "1", "--warmup", "1", "--workers", "1", "--modes", "typical,default",
                       "--json", str(out)])
    assert [(r["arch"], r["mode"]) for r in rows] == [("wrn-10-1", "typical"), ("wrn-10-1", "default")]
    typical, default = rows
    for r in rows:
        assert r["images_per_s"] > 0
        assert r["s_per_epoch"] == pytest.approx(48 / r["images_per_s"])
    assert typical["speedup_vs_typical"] == 1.0
    assert default["speedup_vs_typical"] == pytest.approx(default["images_per_s"] / typical["images_per_s"])
    printed = capsys.readouterr().out
    assert "images/s" in printed and f"{default['s_per_epoch']:.2f}" in printed
    assert json.loads(out.read_text())["rows"] == rows


def test_bench_rejects_unknown_mode():
    with pytest.raises(common.UserError, match="unknown mode"):
        bench.get_args(["--modes", "typical,turbo"])
