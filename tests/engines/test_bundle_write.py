"""A bundle is rewritten whole or not at all: the student weights are named and checked by model.json,
and a refit (or a training into the same folder) killed at any point leaves a bundle that loads as
the old one or as the new one, never a mix."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import bundle as bundle_mod
from engines.data import eval_items, load_images
from engines.train import load_bundle_model, predict, refit_after_training

REPO = Path(__file__).resolve().parents[2]

# Runs a refit in a fresh interpreter and SIGKILLs it at one point of the write (a power cut there).
KILL_AT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from engines import bundle
from engines.train import refit_after_training

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if {point!r} == "before_commit":
    bundle.write_meta = die  # the new weights are on disk, model.json is not yet replaced
else:
    real = bundle.write_meta
    def commit_then_die(*args, **kwargs):  # model.json replaced, the old weights not yet removed
        real(*args, **kwargs)
        die()
    bundle.write_meta = commit_then_die
refit_after_training(Path(sys.argv[1]), blur_sigma=1.0)
"""


def _files(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}


def _scores(bundle: Path, imgs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return predict(load_bundle_model(bundle), imgs)


@pytest.fixture(scope="module")
def images(synthetic_root: Path) -> np.ndarray:
    return load_images([it.path for it in eval_items(synthetic_root)][:6], 128)


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_a_refit_killed_mid_write_leaves_the_old_bundle_or_the_new_one(
    tmp_path: Path, trained_bundle: Path, images: np.ndarray, point: str
):
    old = tmp_path / "old"
    shutil.copytree(trained_bundle, old)
    before = _files(old)
    m_old, s_old = _scores(old, images)
    done = tmp_path / "done"  # the same refit, not interrupted
    shutil.copytree(trained_bundle, done)
    refit_after_training(done, blur_sigma=1.0)
    m_new, s_new = _scores(done, images)
    assert not np.allclose(m_new, m_old, atol=1e-2)  # the refit changes the map: the two states differ

    run = subprocess.run(
        [sys.executable, "-c", KILL_AT.format(repo=str(REPO), point=point), str(old)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == -9, run.stderr
    m, s = _scores(old, images)
    meta = bundle_mod.read_meta(old)
    if point == "before_commit":  # the old bundle, byte for byte where it is named
        assert (old / "model.json").read_bytes() == before["model.json"]
        assert (old / "student.pt").read_bytes() == before["student.pt"]
        np.testing.assert_array_equal(m, m_old)
        np.testing.assert_array_equal(s, s_old)
    else:  # the new bundle, whole
        assert meta["net"]["blur_sigma"] == 1.0 and meta["student"]["file"] != "student.pt"
        # (another process, another thread count: float sums in another order)
        np.testing.assert_allclose(m, m_new, atol=1e-4)
        np.testing.assert_allclose(s, s_new, atol=1e-3)
    assert len(list(old.glob("student*.pt"))) == 2  # the interrupted write's leftover ...
    refit_after_training(old, blur_sigma=2.0)  # ... is cleared by the next write
    left = [p.name for p in old.glob("student*.pt")]
    assert left == [bundle_mod.read_meta(old)["student"]["file"]]
    load_bundle_model(old)


def test_student_weights_other_than_the_recorded_ones_are_refused(tmp_path: Path, trained_bundle: Path):
    """A student.pt that loads but is not the one model.json records (another training's, a
    restored backup, a flipped bit in a weight) is refused by name instead of scoring with it;
    a bundle from before the record still loads."""
    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    sd = torch.load(bad / "student.pt", weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] += 1e-3
    torch.save(sd, bad / "student.pt")
    with pytest.raises(bundle_mod.BundleError, match=r"student\.pt is not the student weights model\.json records"):
        load_bundle_model(bad)
    meta = json.loads((bad / "model.json").read_text())
    assert meta["student"] == {"file": "student.pt", "sha256": bundle_mod.sha256_file(trained_bundle / "student.pt")}
    del meta["student"]
    (bad / "model.json").write_text(json.dumps(meta))
    load_bundle_model(bad)  # the shapes match: without the record nothing can tell


def test_training_again_into_a_bundle_folder_keeps_one_named_student(tmp_path: Path, synthetic_root: Path):
    from engines.train import TrainConfig, train

    cfg = TrainConfig(image_size=64, epochs=1, batch_size=4, max_train_images=8, num_threads=1, device="cpu")
    out = tmp_path / "b"
    train(synthetic_root, out, cfg, quiet=True)
    first = bundle_mod.read_meta(out)["student"]
    train(synthetic_root, out, cfg.model_copy(update={"seed": 1}), quiet=True)
    second = bundle_mod.read_meta(out)["student"]
    assert first["file"] == "student.pt" and second["file"].startswith("student-")
    assert second["sha256"] != first["sha256"]
    assert [p.name for p in out.glob("student*.pt")] == [second["file"]]
    load_bundle_model(out)
