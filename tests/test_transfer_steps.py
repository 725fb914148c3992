"""evaluate.py --transfer-steps: the transfer (gray/black-box) PGD runs as many steps as asked (the AT+ALP
paper's threat model uses 10 to 200 iterations); the default stays PGD-20."""
import pytest

import common
import evaluate
from tests.util import TINY, pgd_at


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    target = pgd_at(TINY + ["--out-dir", str(out / "target")])
    source = pgd_at(TINY + ["--seed", "1", "--out-dir", str(out / "source")])  # an independently trained copy
    return target, source


@pytest.mark.parametrize("flag,steps", [([], 20), (["--transfer-steps", "200"], 200), (["--transfer-steps", "10"], 10)])
def test_transfer_runs_the_requested_number_of_steps(checkpoints, tmp_path, monkeypatch, flag, steps):
    target, source = checkpoints
    source_model, _ = common.build_model_from_checkpoint(source)
    calls, forwards = [], []
    pgd = common.pgd

    def counting_pgd(model, x, y, eps, alpha, n, *a, **k):
        calls.append(n)
        return pgd(lambda z: forwards.append(len(z)) or model(z), x, y, eps, alpha, n, *a, **k)

    monkeypatch.setattr(common, "pgd", counting_pgd)
    report = evaluate.main([target, "--transfer-from", source, "--attacks", "transfer", "--n", "16", "--device", "cpu",
                            "--json", str(tmp_path / "r.json")] + flag)
    assert calls and set(calls) == {steps}  # every transfer batch: the requested number of PGD steps
    assert len(forwards) == steps * len(calls)  # ... and that many gradient steps really ran
    assert 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
