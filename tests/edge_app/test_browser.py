"""The station page and the calibration report in a real headless Chromium (Debian's package).

Each page is saved as a screenshot under test-artifacts/ (LINEINSPECT_TEST_ARTIFACTS).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest

from edge_app.config import load_config
from edge_app.service import Service
from tests.edge_app.browser import make_driver, screenshot
from tests.edge_app.conftest import until, write_config
from tests.edge_app.webtools import PASSWORD, log_rows, users_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def driver():
    d = make_driver()
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def _service(tmp: Path, calibrated: dict, broker, camera: dict) -> Service:
    cal = tmp / "calibration.yaml"
    cal.write_bytes(Path(calibrated["calibration"]).read_bytes())
    web = {"port": 0, "auth": {"users_file": str(users_file(tmp))}, "live_max_hz": 5}
    cfg = write_config(tmp / "station.yaml", {**calibrated, "calibration": cal}, broker, tmp, [camera], web=web)
    svc = Service(load_config(cfg), cfg)
    svc.start()
    return svc


def _text(driver, css: str) -> str:
    """The element's text, "" while it is not there (a page still loading)."""
    found = driver.find_elements("css selector", css)
    return found[0].text if found else ""


def test_the_live_view_updates_by_itself_as_frames_are_inspected(driver, tmp_path, calibrated, broker, part_images):
    cam = {"id": "cam1", "type": "folder", "path": str(part_images), "loop": True, "rate_hz": 4}
    svc = _service(tmp_path, calibrated, broker, cam)
    try:
        driver.get(svc.web.url)
        frame = "figure.cam [data-field=frame]"
        assert until(lambda: int(_text(driver, frame) or 0) >= 1, 20)
        first_frame, first_part = int(_text(driver, frame)), _text(driver, "figure.cam [data-field=part]")
        # no reload: the same document sees later frames and parts
        driver.execute_script("window.__same_document = true")
        assert until(lambda: int(_text(driver, frame) or 0) >= first_frame + 3, 20)
        assert driver.execute_script("return window.__same_document === true")
        assert _text(driver, "figure.cam [data-field=part]") != first_part or int(_text(driver, frame)) > first_frame
        # the picture is the latest frame, drawn (a JPEG the browser decoded)
        assert until(
            lambda: (
                driver.execute_script(
                    "const i = document.querySelector('figure.cam img'); return i.complete && i.naturalWidth"
                )
                == 480
            ),
            10,
        )
        verdict = driver.find_element("css selector", "figure.cam .verdict")
        assert verdict.get_attribute("class").split()[-1] in ("ok", "ng")
        assert _text(driver, "#state") == "OK: inspecting"
        assert until(lambda: int(_text(driver, "#n-ok") or 0) + int(_text(driver, "#n-ng") or 0) >= 4, 10)
        assert driver.find_elements("css selector", "#trend circle")
        assert driver.find_elements("css selector", "#trend line.thr")
        assert "inference" in _text(driver, "#latency")
        screenshot(driver, "live.png")
    finally:
        svc.shutdown()


def test_what_if_login_apply_and_csv_in_the_browser(driver, tmp_path, calibrated, broker, part_images):
    cam = {"id": "cam1", "type": "folder", "path": str(part_images)}
    svc = _service(tmp_path, calibrated, broker, cam)
    db = tmp_path / "log.sqlite"
    try:
        assert until(lambda: len(log_rows(db)) == 12, 60)
        rows = log_rows(db)
        base = svc.web.url.rstrip("/")
        # what-if: the numbers the page shows, computed here straight from the log
        t = sorted(r["score"] for r in rows)[5]
        driver.get(base + "/calibration")
        box = driver.find_element("id", "whatif-input")
        box.clear()
        box.send_keys(f"{t:.6f}")
        driver.find_element("id", "whatif-button").click()
        assert until(lambda: driver.find_elements("id", "rejected"), 10)
        t_shown = float(f"{t:.6f}")
        want = sum(r["score"] >= t_shown or bool(json.loads(r["regions"])) for r in rows)
        now = svc.inspector.calibration.image_threshold
        want_now = sum(r["score"] >= now or bool(json.loads(r["regions"])) for r in rows)
        assert _text(driver, "#rejected").startswith(f"{want} (")
        assert _text(driver, "#rejected-now").startswith(f"{want_now} (")
        assert driver.find_elements("css selector", "#hist rect.bar")
        # apply needs a login
        assert not driver.find_elements("id", "apply")
        assert driver.find_elements("id", "apply-needs-login")
        screenshot(driver, "calibration.png")
        driver.get(base + "/login?next=/calibration")
        driver.find_element("id", "user-input").send_keys("alice")
        driver.find_element("id", "password-input").send_keys("not the password")
        driver.find_element("id", "login-button").click()
        # the refused login answers with a new page: wait for it (reading at once raced its load)
        assert until(lambda: "wrong user name or password" in _text(driver, "#error"), 10)
        screenshot(driver, "login-refused.png")
        driver.get(base + f"/calibration?whatif={t_shown}")
        assert not driver.find_elements("id", "apply")
        driver.get(base + "/login?next=/calibration")
        driver.find_element("id", "user-input").send_keys("alice")
        driver.find_element("id", "password-input").send_keys(PASSWORD)
        driver.find_element("id", "login-button").click()
        assert until(lambda: _text(driver, "#user") == "alice", 10)
        driver.get(base + f"/calibration?whatif={t_shown}")
        driver.find_element("id", "apply").click()
        assert until(lambda: "New threshold applied" in _text(driver, "#done"), 10)
        assert float(_text(driver, "#threshold")) == pytest.approx(t_shown, abs=1e-4)
        assert svc.inspector.calibration.image_threshold == t_shown
        assert "apply_threshold" in _text(driver, "#audit") and "alice" in _text(driver, "#audit")
        screenshot(driver, "calibration-applied.png")

        # history and its CSV export: fetched by the page's own link, compared with the log
        driver.get(base + "/history")
        assert _text(driver, "#total").startswith("12 part(s)")
        href = driver.find_element("id", "csv").get_attribute("href")
        text = driver.execute_async_script(
            "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => r.text()).then(done);", href
        )
        got = list(csv.DictReader(io.StringIO(text)))
        assert [(g["key"], g["verdict"]) for g in got] == [(r["key"], r["verdict"]) for r in rows]
        assert [float(g["score"]) for g in got] == [r["score"] for r in rows]
        screenshot(driver, "history.png")
        driver.get(base + "/history?verdict=ng")
        assert _text(driver, "#total").startswith(f"{sum(r['verdict'] == 'ng' for r in rows)} part(s)")
        assert driver.execute_script(
            "return [...document.querySelectorAll('tr.thumbs img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        screenshot(driver, "history-ng.png")
        driver.get(base + "/model")
        assert _text(driver, "#backend") == "onnxruntime"
        screenshot(driver, "model.png")
    finally:
        svc.shutdown()


def test_the_calibration_report_shows_its_charts_in_the_browser(driver, tmp_path, exported_bundle):
    from edge_app.cli import main
    from engines.synthetic import make_dataset

    parts = make_dataset(tmp_path / "ds", n_train=60, n_test_good=2, n_test_per_defect=4, size=128, seed=3)

    out = tmp_path / "cal.yaml"
    code = main(
        [
            "calibrate",
            "--bundle",
            str(exported_bundle),
            "--good",
            str(parts / "train" / "good"),
            "--defects",
            str(parts),
            "--alpha",
            "0.05",
            "--yes",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    driver.get(out.with_suffix(".html").as_uri())
    plots = driver.find_elements("css selector", "img.plot")
    assert [p.get_attribute("alt") for p in plots] == ["histogram", "roc"]
    for p in plots:
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", p) > 300
        src = p.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    thumbs = driver.find_elements("css selector", ".ex img")
    assert thumbs and all(driver.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
    screenshot(driver, "calibration-report.png")
