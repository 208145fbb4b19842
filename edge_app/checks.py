"""``lineinspect check-config`` beyond the schema: do the files the config names exist, can they
be read, does the bundle load and does the calibration belong to its model. No torch, no SDKs:
metadata and hashes only (the runtime itself is loaded by ``lineinspect run``)."""

from __future__ import annotations

import os
from pathlib import Path

from edge_app.config import FolderCamera, PylonCamera, ServiceConfig, read_secret

Problem = tuple[tuple, str, object]  # (yaml location, message, value)


def _readable_file(path: Path) -> str | None:
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a file"
    if not os.access(path, os.R_OK):
        return "not readable by this user"
    return None


def _writable_dir_for(path: Path) -> str | None:
    """A folder (or file's folder) the service must create files in."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable by this user"
    return None


def _writable_file_at(path: Path) -> str | None:
    """A file the service creates or keeps writing (the SQLite database: it exists after the first
    start, and SQLite also creates its journal beside it, so its folder must be writable too)."""
    p = Path(path)
    if p.exists():
        if not p.is_file():
            return f"{p} is not a file"
        if not os.access(p, os.R_OK | os.W_OK):
            return f"{p} is not writable by this user"
    return _writable_dir_for(p.parent)


def deep_check(cfg: ServiceConfig) -> list[Problem]:
    from calibration.calibfile import CalibrationError, load_calibration
    from engines import bundle as bundle_mod
    from engines.runtime.base import ModelFileError, onnx_path_checked

    problems: list[Problem] = []
    model_sha = None
    try:
        meta = bundle_mod.read_meta(cfg.model.bundle)
        onnx_path_checked(cfg.model.bundle, meta, verify_sha=True)
        model_sha = meta["onnx"]["sha256"]
    except (bundle_mod.BundleError, ModelFileError) as exc:
        problems.append((("model", "bundle"), str(exc), str(cfg.model.bundle)))
    try:
        load_calibration(cfg.calibration.file, model_sha)
    except CalibrationError as exc:
        problems.append((("calibration", "file"), str(exc), str(cfg.calibration.file)))
    for i, cam in enumerate(cfg.cameras):
        if isinstance(cam, FolderCamera):
            if not cam.path.is_dir():
                problems.append((("cameras", i, "path"), "image folder not found", str(cam.path)))
            elif not os.access(cam.path, os.R_OK | os.X_OK):
                problems.append((("cameras", i, "path"), "image folder not readable by this user", str(cam.path)))
        if isinstance(cam, PylonCamera) and cam.emulator_image_dir and not cam.emulator_image_dir.is_dir():
            problems.append((("cameras", i, "emulator_image_dir"), "folder not found", str(cam.emulator_image_dir)))
    mq = cfg.mqtt
    if mq.tls:
        for name in ("ca_file", "cert_file", "key_file"):
            f = getattr(mq.tls, name)
            why = _readable_file(f) if f is not None else None
            if why:
                problems.append((("mqtt", "tls", name), why, str(f)))
    if mq.username or mq.password_file or mq.password_credential:
        try:
            read_secret(mq)
        except ValueError as exc:
            where = "password_file" if mq.password_file else "password_credential"
            problems.append((("mqtt", where), str(exc), str(mq.password_file or mq.password_credential)))
    for name, check in (("database", _writable_file_at), ("archive_dir", _writable_dir_for)):
        why = check(getattr(cfg.storage, name))
        if why:
            problems.append((("storage", name), why, str(getattr(cfg.storage, name))))
    web = cfg.web
    if web.enabled:
        if web.tls:
            for name in ("cert_file", "key_file"):
                why = _readable_file(getattr(web.tls, name))
                if why:
                    problems.append((("web", "tls", name), why, str(getattr(web.tls, name))))
        if web.auth.users_file or web.auth.users_credential:
            from edge_app.web.auth import load_users

            try:
                load_users(web.auth)
            except ValueError as exc:
                where = "users_file" if web.auth.users_file else "users_credential"
                problems.append(
                    (("web", "auth", where), str(exc), str(web.auth.users_file or web.auth.users_credential))
                )
        if web.review_dir:
            why = _writable_dir_for(web.review_dir / "x")
            if why:
                problems.append((("web", "review_dir"), why, str(web.review_dir)))
    return problems
