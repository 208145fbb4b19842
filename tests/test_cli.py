"""The ``lineinspect`` command on bad input: a clear error naming the path, exit code 2."""

from pathlib import Path

import pytest

from edge_app.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_train_on_missing_folder(tmp_path: Path, capsys):
    code, err = run(capsys, "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 2
    assert "dataset folder not found" in err and "nope" in err


def test_train_on_empty_folder(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, "train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 2
    assert "neither an MVTec-style dataset" in err and str(tmp_path / "empty") in err


def test_train_on_unreadable_image(tmp_path: Path, capsys):
    good = tmp_path / "ds" / "train" / "good"
    good.mkdir(parents=True)
    import cv2
    import numpy as np

    for i in range(3):
        cv2.imwrite(str(good / f"{i}.png"), np.full((32, 32), 128, np.uint8))
    (good / "broken.png").write_bytes(b"\x89PNG truncated")
    code, err = run(capsys, "train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 2
    assert "cannot read image" in err and "broken.png" in err
    assert not (tmp_path / "b" / "model.json").exists()


def test_train_with_unknown_config_key(tmp_path: Path, capsys, synthetic_root):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("epoch: 3\n")
    code, err = run(capsys, "train", "--data", str(synthetic_root), "--out", str(tmp_path / "b"), "--config", str(cfg))
    assert code == 2 and "epoch" in err and "Extra inputs are not permitted" in err


def test_evaluate_needs_a_test_split(tmp_path: Path, capsys, trained_bundle):
    (tmp_path / "only_good").mkdir()
    code, err = run(capsys, "evaluate", "--bundle", str(trained_bundle), "--data", str(tmp_path / "only_good"))
    assert code == 2 and "has no test/ folder" in err


def test_evaluate_on_a_folder_that_is_no_bundle(tmp_path: Path, capsys, synthetic_root):
    code, err = run(capsys, "evaluate", "--bundle", str(tmp_path), "--data", str(synthetic_root))
    assert code == 2 and "model.json" in err and "not a model bundle" in err


def test_evaluate_writes_table_json_and_overlays(tmp_path: Path, capsys, trained_bundle, synthetic_root):
    code = main(
        [
            "evaluate",
            "--bundle",
            str(trained_bundle),
            "--data",
            str(synthetic_root),
            "--out",
            str(tmp_path / "ev"),
            "--overlays",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "img AUROC" in out and "scratch" in out and "all" in out
    assert (tmp_path / "ev" / "metrics.json").is_file()
    pngs = sorted((tmp_path / "ev" / "overlays").glob("*.png"))
    assert len(pngs) == 3
    import cv2

    strip = cv2.imread(str(pngs[0]))
    assert strip.shape == (128, 3 * 128, 3)


@pytest.mark.parametrize("argv", [["train"], ["evaluate", "--bundle", "x"], []])
def test_missing_arguments_exit_nonzero(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_evaluate_without_masks_reports_image_and_plant_metrics(tmp_path: Path, capsys, trained_bundle, synthetic_root):
    """Plants label parts good / bad without masks: evaluate still works and says what it cannot tell."""
    import json
    import shutil

    data = tmp_path / "no_masks"
    shutil.copytree(synthetic_root, data)
    shutil.rmtree(data / "ground_truth")
    # 60 held-out good training images: enough for the tail fit behind the 1 % plant metric
    from engines.synthetic import make_dataset

    more = make_dataset(tmp_path / "more", n_train=60, n_test_good=1, n_test_per_defect=1, size=128)
    meta_path = tmp_path / "bundle" / "model.json"
    shutil.copytree(trained_bundle, tmp_path / "bundle")
    meta = json.loads(meta_path.read_text())
    meta["training"]["data"] = str(more)
    meta["training"]["config"]["val_fraction"] = 0.85
    meta_path.write_text(json.dumps(meta))
    code = main(["evaluate", "--bundle", str(tmp_path / "bundle"), "--data", str(data), "--overlays", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "pixel AUROC and AU-PRO are not available" in out
    assert "at a 1% false-reject target" in out and "observed false rejects" in out and "scratch" in out


def test_refit_gives_a_bundle_another_blur_and_refuses_what_it_cannot_do(tmp_path: Path, capsys, trained_bundle):
    """lineinspect refit: another blur without training again (the exported graph, which no longer
    matches, is removed and the output says to export and calibrate again); nothing to change, a
    bad value, or a bundle whose training images are gone: exit 2 with the reason, bundle untouched."""
    import json
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(trained_bundle, bundle, ignore=shutil.ignore_patterns("eval"))
    (bundle / "model.onnx").write_bytes(b"stale graph")

    def files() -> dict:
        return {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}

    before = files()
    code, err = run(capsys, "refit", "--bundle", str(bundle))
    assert code == 2 and "nothing to change" in err
    code, err = run(capsys, "refit", "--bundle", str(bundle), "--blur-sigma", "-1")
    assert code == 2 and "blur_sigma" in err
    gone = tmp_path / "gone"
    shutil.copytree(bundle, gone)
    meta = json.loads((gone / "model.json").read_text())
    meta["training"]["data"] = str(tmp_path / "moved-away")
    (gone / "model.json").write_text(json.dumps(meta))
    code, err = run(capsys, "refit", "--bundle", str(gone), "--blur-sigma", "1")
    assert code == 2 and "moved-away" in err and "not on disk" in err
    assert files() == before

    code = main(["refit", "--bundle", str(bundle), "--blur-sigma", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "blur_sigma 2.0 -> 1.0" in out and "export it again" in out
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["net"]["blur_sigma"] == 1.0 and meta["onnx"] is None and not (bundle / "model.onnx").exists()
    assert meta["map_stats"]["pos_mean"] != json.loads(before["model.json"])["map_stats"]["pos_mean"]
