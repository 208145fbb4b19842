"""check-config refuses what `lineinspect run` would die on: options a backend lacks, and files that
are missing, unreadable or belong to another model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from edge_app.cli import main
from tests.edge_app.conftest import write_config


def station(tmp_path: Path, calibrated: dict, part_images: Path, **sections) -> Path:
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images)}]
    return write_config(tmp_path / "c.yaml", calibrated, None, tmp_path, cams, **sections)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"backend": "onnxruntime", "precision": "f32"}, "backend onnxruntime has no option 'precision'"),
        ({"backend": "tensorrt", "threads": 4}, "backend tensorrt has no option 'threads'"),
        ({"backend": "openvino", "precision": "fp16"}, "model.precision"),
        ({"backend": "onnx"}, "model.backend must be one of: onnxruntime, openvino, tensorrt, torch"),
    ],
)
def test_options_a_backend_does_not_have_are_refused(tmp_path, calibrated, part_images, capsys, model, expected):
    cfg = station(tmp_path, calibrated, part_images)
    data = yaml.safe_load(cfg.read_text())
    data["model"] = {"bundle": data["model"]["bundle"], **model}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["check-config", "--schema-only", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "(line " in err


def test_each_backend_gets_exactly_its_options(tmp_path, calibrated, part_images):
    from edge_app.config import load_config

    cfg = station(tmp_path, calibrated, part_images)
    data = yaml.safe_load(cfg.read_text())
    for model, opts in [
        ({"backend": "onnxruntime", "threads": 2}, {"device": "cpu", "threads": 2}),
        ({"backend": "openvino", "precision": "bf16"}, {"device": "CPU", "precision": "bf16"}),
        ({"backend": "tensorrt"}, {"device": 0, "precision": "fp16"}),
        ({"threads": 1}, {"device": "cpu", "threads": 1}),  # no backend key: onnxruntime
    ]:
        data["model"] = {"bundle": data["model"]["bundle"], **model}
        cfg.write_text(yaml.safe_dump(data))
        assert load_config(cfg).model.runtime_options() == opts


def test_a_good_station_passes_the_file_checks(tmp_path, calibrated, part_images, capsys):
    cfg = station(tmp_path, calibrated, part_images)
    assert main(["check-config", str(cfg)]) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out


def test_missing_and_mismatched_files_are_named(tmp_path, calibrated, part_images, capsys):
    # a calibration made for another model export
    other = yaml.safe_load(Path(calibrated["calibration"]).read_text())
    other["model_onnx_sha256"] = "0" * 64
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    (tmp_path / "ca.pem").write_text("x")
    cfg = station(
        tmp_path,
        calibrated,
        part_images,
        calibration={"file": str(tmp_path / "other.yaml")},
        mqtt={
            "username": "plc",
            "password_file": str(tmp_path / "no-password"),
            "tls": {"ca_file": str(tmp_path / "nope.pem")},
        },
        web={
            "port": 0,
            "tls": {"cert_file": str(tmp_path / "no-web.crt"), "key_file": str(tmp_path / "ca.pem")},
            "auth": {"users_file": str(tmp_path / "ca.pem")},
        },
    )
    data = yaml.safe_load(cfg.read_text())
    data["cameras"][0]["path"] = str(tmp_path / "no-camera-dir")
    cfg.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "calibration.file (line" in err and "was made for model 000000000000" in err
    assert "cameras.0.path (line" in err and "image folder not found" in err
    assert "mqtt.tls.ca_file (line" in err and "file not found" in err
    assert "mqtt.password_file (line" in err and "no-password" in err
    assert "web.tls.cert_file (line" in err and "no-web.crt" in err and "web.tls.key_file" not in err
    assert "web.auth.users_file (line" in err and "expected 'name:secret'" in err
    assert main(["check-config", "--schema-only", str(cfg)]) == 0, "the schema alone is fine"
    # a bundle whose model.onnx is damaged
    broken = tmp_path / "bundle"
    shutil.copytree(calibrated["bundle"], broken)
    onnx = broken / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    data["model"]["bundle"] = str(broken)
    cfg.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(cfg)]) == 1
    assert "model.bundle (line" in capsys.readouterr().err


def test_a_station_whose_database_exists_passes_and_a_database_that_is_no_file_is_named(
    tmp_path, calibrated, part_images, capsys
):
    """After the first start the SQLite database exists: check-config (the unit's ExecStartPre) must
    still pass, or the service would never start again; a folder or a read-only file in its place is
    named."""
    import os
    import sqlite3

    cfg = station(tmp_path, calibrated, part_images)
    db = Path(yaml.safe_load(cfg.read_text())["storage"]["database"])
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as con:  # a real database file where the service keeps its decisions
        con.execute("create table t (x)")
    assert main(["check-config", str(cfg)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    if os.geteuid() != 0:  # root writes through any mode bits
        db.chmod(0o444)
        assert main(["check-config", str(cfg)]) == 1
        assert "storage.database (line" in capsys.readouterr().err
        db.chmod(0o644)
    db.unlink()
    db.mkdir()
    assert main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "storage.database (line" in err and "is not a file" in err
