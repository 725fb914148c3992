"""Copying a method into another project: the method files and common.py, alone in a folder, train a plain
nn.Module in the user's own short loop (README, "Use a method in your own training loop")."""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ["common.py", "ltd.py", "at_alp.py", "infoard.py", "defensive_distillation.py"]

# The user's project: their own models (no Classifier), data and loop; only the copied files come from us.
USER_LOOP = r'''
import copy, json, math
import torch, torch.nn as nn, torch.nn.functional as F
import at_alp, common, defensive_distillation as dd, infoard, ltd

torch.set_num_threads(1)
torch.manual_seed(0)
protos = torch.rand(10, 3, 8, 8)
y = torch.randint(10, (64,))
x = (0.6 * protos[y] + 0.4 * torch.rand(64, 3, 8, 8)).clamp(0, 1)  # images in [0, 1]
eps, alpha, steps = 4 / 255, 1 / 255, 3


def plain():  # no return_features: enough for every loss with its feature terms off
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))


class TwoStage(nn.Module):  # the model contract of the feature terms: stage maps and pooled features on request
    def __init__(self):
        super().__init__()
        self.s1, self.s2, self.fc = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Linear(16, 10)

    def forward(self, x, return_features=False):
        a = F.relu(self.s1(x - 0.5))  # normalisation inside the model
        b = F.relu(self.s2(a))
        pooled = b.mean((2, 3))
        logits = self.fc(pooled)
        return (logits, {"stages": [a, b], "pooled": pooled}) if return_features else logits


def train(model, step, extra=(), n=20):
    """The user's loop: step(model) -> loss, (loss, logits) or (loss, logits, called between backward and step)."""
    opt = torch.optim.Adam([*model.parameters(), *extra], 1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(n):
        model.train()
        out = step(model)
        loss, *rest = out if isinstance(out, tuple) else (out,)
        opt.zero_grad()
        loss.backward()
        if len(rest) == 2:
            rest[1]()
        opt.step()
        losses.append(loss.item())
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return {"first": losses[0], "last": losses[-1], "finite": all(map(math.isfinite, losses)), "changed": changed}


teacher = plain()
train(teacher, lambda m: F.cross_entropy(m(x), y))
teacher.eval()
feature_teacher = TwoStage()
train(feature_teacher, lambda m: F.cross_entropy(m(x), y))
feature_teacher.eval()


def ltd_step(m, proxy=copy.deepcopy(plain())):
    x_adv = ltd.trades_attack(m, x, eps, alpha, steps, tau_s=2.0)
    soft = ltd.teacher_soft_labels(teacher, x, tau_t=0.5)
    saved = ltd.awp_perturb(m, proxy, lambda net: ltd.ltd_loss(net, x, x_adv, y, 6.0, 2.0, soft)[0], 5e-3)
    loss, logits = ltd.ltd_loss(m, x, x_adv, y, beta=6.0, tau_s=2.0, soft=soft)  # at the perturbed weights
    return loss, logits, lambda: ltd.awp_restore(m, saved)


heads = infoard.ProjectionHeads(16, 16)
results = {
    "ltd": train(plain(), ltd_step),
    "at_alp (ALP only)": train(plain(), lambda m: at_alp.at_alp_loss(m, x, y, eps, alpha, steps, beta_at=0)),
    "at_alp (attention)": train(TwoStage(), lambda m: at_alp.at_alp_loss(m, x, y, eps, alpha, steps)),
    "infoard (logits)": train(plain(), lambda m: infoard.infoard_loss(m, teacher, None, x, y, eps, alpha, steps,
                                                                       w_nce=0, w_at=0)),
    "infoard (all terms)": train(TwoStage(), lambda m: infoard.infoard_loss(m, feature_teacher, heads, x, y, eps,
                                                                            alpha, steps), extra=heads.parameters()),
    "defensive distillation (F)": train(plain(), lambda m: dd.temperature_ce_loss(m, x, y, 10.0)),
    "defensive distillation (F_d)": train(plain(), lambda m: dd.distillation_loss(m, x, dd.soft_labels(teacher, x, 10.0),
                                                                                  10.0)),
}
print(json.dumps({"common": common.__file__, "results": results}))
'''


def test_copied_methods_train_a_plain_module_in_a_users_loop(tmp_path):
    for name in COPIED:
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    (tmp_path / "train_mine.py").write_text(USER_LOOP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "train_mine.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert os.path.dirname(out["common"]) == str(tmp_path)  # the copy, not the repository's common.py
    assert len(out["results"]) == 7
    for name, res in out["results"].items():
        assert res["finite"] and res["changed"], (name, res)
        assert res["last"] < res["first"], (name, res)
