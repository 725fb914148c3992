"""PGD-AT on real photos through the image-folder loader: 300 + 50 CIFAR-10 (JPEG copy) images, end to end.

The synthetic tests cover every code path; this one checks that the path the papers' users take holds on real
JPEG files: class discovery and decoding in the `folder` dataset, the tree's own normalisation statistics, eps 8/255,
crop + flip, a BatchNorm WRN trained adversarially from its own script, and evaluate.py on the saved checkpoint.
Skipped unless CIFAR10_JPEG_NPZ points at the packed JPEG copy (`cifar10_jpeg.npz`: `blob`, `offsets`, `labels`,
`split`, `classes`; CI sets it when the shared data folder has it).
"""
import json
import os

import numpy as np
import pytest
import torch

import at_alp
import common
import evaluate
from tests.util import torch_threads

NPZ = os.environ.get("CIFAR10_JPEG_NPZ")
pytestmark = pytest.mark.skipif(not NPZ, reason="set CIFAR10_JPEG_NPZ to cifar10_jpeg.npz")
PGD_AT = ["--alp", "0", "--at", "0", "--w-clean", "0", "--w-adv", "1"]


def unpack_subset(npz, root, per_class):
    """Write the first per_class[split] images of each class as root/{train,test}/<class>/<i>.jpg."""
    pack = np.load(npz)
    blob, offsets, labels, split = pack["blob"], pack["offsets"], pack["labels"], pack["split"]
    classes = [str(c) for c in pack["classes"]]
    for s, part in enumerate(("train", "test")):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, part, name))
            idx = np.flatnonzero((split == s) & (labels == c))[:per_class[part]]
            for i, j in enumerate(idx):
                with open(os.path.join(root, part, name, f"{i}.jpg"), "wb") as f:
                    f.write(blob[offsets[j]:offsets[j + 1]].tobytes())
    return classes


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar10-jpeg"))
    return root, unpack_subset(NPZ, root, {"train": 30, "test": 5})


def test_folder_tree_loads_as_cifar(tree):
    root, classes = tree
    (x, y), info = common.load_dataset("folder", root, train=True)
    (xt, yt), _ = common.load_dataset("folder", root, train=False)
    assert x.shape == (300, 3, 32, 32) and xt.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    assert info.classes == sorted(classes) and info.num_classes == 10 and not info.large
    assert info.eps == pytest.approx(8 / 255)
    assert torch.bincount(y).tolist() == [30] * 10 and torch.bincount(yt).tolist() == [5] * 10
    # statistics of these photos, near CIFAR-10's (a synthetic or mis-decoded tree is far from them)
    assert all(abs(a - b) < 0.03 for a, b in zip(info.mean + info.std, common.CIFAR_MEAN + common.CIFAR_STD))


def test_pgd_at_trains_and_evaluates_on_the_tree(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "pgd-at"
    with torch_threads(2):
        path = at_alp.main(["--dataset", "folder", "--data-dir", root, "--arch", "wrn-16-1", "--device", "cpu",
                            "--epochs", "1", "--batch-size", "50", "--val-size", "50", "--steps", "2",
                            "--out-dir", str(out)] + PGD_AT)
        report = evaluate.main([path, "--preset", "quick", "--n", "50", "--device", "cpu", "--quiet",
                                "--json", str(tmp_path / "r.json")])
    model, ckpt = common.build_model_from_checkpoint(path)
    assert ckpt["dataset"] == "folder" and ckpt["arch"] == "wrn-16-1"
    assert ckpt["args"]["augment"] and ckpt["args"]["eps"] == pytest.approx(8 / 255)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))  # BN statistics were learnt
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 1 and all(np.isfinite(r["loss"]) for r in log)
    assert report["dataset"] == "folder" and report["n"] == 50
    assert 0 <= report["robust_acc"] <= report["clean_acc"] <= 1
