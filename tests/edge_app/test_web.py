"""The station page against a real service: real mosquitto, folder camera, ONNX Runtime, SQLite,
uvicorn on a loopback port, plain HTTP requests."""

from __future__ import annotations

import csv
import io
import json
import socket
from pathlib import Path

import pytest

from calibration.calibfile import load_calibration
from edge_app.config import load_config
from edge_app.service import Service
from tests.edge_app.conftest import until, write_config
from tests.edge_app.webtools import PASSWORD, Client, log_rows, query, users_file


def _start(tmp: Path, calibrated: dict, broker, cameras: list[dict], **sections) -> Service:
    web = {"port": 0, "auth": {"users_file": str(users_file(tmp))}}
    web.update(sections.pop("web", {}))
    cfg = write_config(tmp / "station.yaml", calibrated, broker, tmp, cameras, web=web, **sections)
    svc = Service(load_config(cfg), cfg)
    svc.start()
    return svc


@pytest.fixture
def station(tmp_path, calibrated, broker, part_images):
    """A service that has inspected the 12 part images, its calibration file a copy of its own."""
    cal = tmp_path / "calibration.yaml"
    cal.write_bytes(Path(calibrated["calibration"]).read_bytes())
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images)}]
    svc = _start(tmp_path, {**calibrated, "calibration": cal}, broker, cams)
    assert until(lambda: sum(svc.counts.values()) == 12, 60)
    assert until(lambda: len(log_rows(tmp_path / "log.sqlite")) == 12, 30)
    yield svc, Client(svc.web.url), tmp_path
    svc.shutdown()


def test_read_only_pages_and_apis_say_what_the_log_says(station):
    svc, c, tmp = station
    for path in ("/", "/history", "/calibration", "/model", "/login"):
        r = c.get(path)
        assert r.status == 200, path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    rows = log_rows(tmp / "log.sqlite")
    status = c.get("/api/status").json()
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("ok", "ng", "not_inspected")}
    assert status["snapshot"]["verdicts"] == counts
    assert status["cameras"]["cam1"]["key"] == rows[-1]["key"]
    assert len(status["trend"]) == 12
    page = c.get("/api/verdicts?per_page=5&page=2").json()
    assert page["total"] == 12 and page["pages"] == 3
    assert [r["id"] for r in page["rows"]] == [r["id"] for r in rows[::-1][5:10]]
    ng = c.get("/api/verdicts?verdict=ng").json()
    assert ng["total"] == counts["ng"] > 0
    # the live picture is a JPEG of the latest frame
    pic = c.get("/live/cam1.jpg")
    assert pic.status == 200 and pic.body[:2] == b"\xff\xd8" and pic.headers["X-Verdict-Key"] == rows[-1]["key"]
    # archived NG image and its heatmap
    ng_id = next(r["id"] for r in rows if r["verdict"] == "ng")
    assert until(lambda: c.get(f"/archive/{ng_id}/heat").status == 200, 10)
    assert c.get(f"/archive/{ng_id}/image").body[:4] == b"\x89PNG"
    assert "MVTec" not in c.get("/model").text and svc.runtime.model_sha256 in c.get("/model").text


def test_csv_export_matches_the_log(station):
    _, c, tmp = station
    r = c.get("/verdicts.csv")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    got = list(csv.DictReader(io.StringIO(r.text)))
    rows = log_rows(tmp / "log.sqlite")
    assert [g["key"] for g in got] == [x["key"] for x in rows]
    for g, x in zip(got, rows, strict=True):
        assert g["verdict"] == x["verdict"] and g["part_id"] == x["part_id"]
        assert (float(g["score"]) if g["score"] else None) == x["score"]
        assert float(g["t_decided"]) == x["t_decided"]
    ng = list(csv.DictReader(io.StringIO(c.get("/verdicts.csv?verdict=ng").text)))
    assert [g["key"] for g in ng] == [x["key"] for x in rows if x["verdict"] == "ng"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/history?verdict=maybe", "verdict must be one of"),
        ("/history?from=yesterday", "from must be a time"),
        ("/history?page=0", "page must be between"),
        ("/history?from=2026-12-02T10:00&to=2026-12-01T10:00", "ends before it starts"),
        ("/calibration?whatif=abc", "must be a number"),
        ("/calibration?whatif=nan", "finite"),
        ("/calibration?whatif=-1", "above 0"),
        ("/api/whatif?threshold=1&n=5", "n must be between"),
    ],
)
def test_bad_input_gets_a_clear_message(station, path, message):
    _, c, _ = station
    r = c.get(path)
    assert r.status == 400
    assert message in r.text


def test_changes_need_a_login_and_the_csrf_token_and_are_audited(station):
    svc, c, tmp = station
    cal_file = Path(svc.cfg.calibration.file)
    before = cal_file.read_bytes()
    old = svc.inspector.calibration
    new_t = round(old.image_threshold * 0.5, 4)

    # no session
    r = c.post("/calibration/apply", {"threshold": str(new_t)})
    assert r.status == 401 and "log in first" in r.text
    # wrong password: refused, no session cookie
    r = c.login(password="wrong")
    assert r.status == 401 and "wrong user name or password" in r.text
    assert not any(ck.name == "lineinspect_session" for ck in c.jar)
    assert c.post("/pause", {}).status == 401
    # logged in, but no / a wrong CSRF token
    assert c.login().status == 303
    assert c.post("/calibration/apply", {"threshold": str(new_t)}).status == 403
    assert c.post("/calibration/apply", {"threshold": str(new_t), "csrf": "forged"}).status == 403
    # another session's token does not work either
    other = Client(svc.web.url)
    other.login()
    assert c.post("/calibration/apply", {"threshold": str(new_t), "csrf": other.csrf()}).status == 403
    # bad values: clear message, nothing changed
    token = c.csrf()
    for bad, msg in (("abc", "must be a number"), ("inf", "finite"), ("0", "above 0"), ("", "give the new")):
        r = c.post("/calibration/apply", {"threshold": bad, "csrf": token})
        assert r.status == 400 and msg in r.text, bad
    assert cal_file.read_bytes() == before
    assert svc.inspector.calibration.id == old.id
    assert query(tmp / "log.sqlite", "SELECT COUNT(*) FROM audit")[0][0] == 0

    # the real thing
    r = c.post("/calibration/apply", {"threshold": str(new_t), "csrf": token})
    assert r.status == 303 and r.headers["Location"] == "/calibration?done=applied"
    now = svc.inspector.calibration
    assert now.image_threshold == new_t and now.id != old.id
    on_disk = load_calibration(cal_file, svc.runtime.model_sha256)
    assert on_disk.id == now.id and on_disk.pixel_threshold == old.pixel_threshold
    kept = cal_file.with_name(f"calibration.{old.id}.yaml")
    assert kept.read_bytes() == before
    (audit,) = query(tmp / "log.sqlite", "SELECT user, remote, action, detail, outcome FROM audit")
    assert audit[:3] == ("alice", "127.0.0.1", "apply_threshold")
    assert json.loads(audit[3])["threshold"] == new_t and json.loads(audit[3])["previous_calibration"] == old.id
    assert audit[4].startswith(f"applied: calibration {now.id}")
    assert "apply_threshold" in c.get("/calibration").text

    # pause / resume through the page, audited; header token works for scripts (JSON reply)
    r = c.post("/pause", {}, headers={"X-CSRF-Token": token})
    assert r.status == 200 and r.json()["ok"] and svc.paused.is_set()
    assert c.get("/api/status").json()["snapshot"]["paused"] is True
    assert c.post("/resume", {"csrf": token}).status == 303 and not svc.paused.is_set()
    actions = [a for (a,) in query(tmp / "log.sqlite", "SELECT action FROM audit ORDER BY id")]
    assert actions == ["apply_threshold", "pause", "resume"]
    # logging out ends the session: the old token is worthless
    assert c.post("/logout", {"csrf": token}).status == 303
    assert c.post("/pause", {"csrf": token}).status == 401


def test_marked_parts_are_collected_for_train_and_calibrate_and_counted_by_the_what_if(station):
    svc, c, tmp = station
    rows = log_rows(tmp / "log.sqlite")
    ngs = [r for r in rows if r["verdict"] == "ng"]
    ok = next(r for r in rows if r["verdict"] == "ok")
    assert len(ngs) >= 2
    c.login()
    token = c.csrf("/history")
    assert until(lambda: all(c.get(f"/archive/{r['id']}/image").status == 200 for r in ngs[:2]), 10)
    assert c.post("/review", {"id": ngs[0]["id"], "label": "false_reject", "csrf": token}).status == 303
    assert c.post("/review", {"id": ngs[1]["id"], "label": "confirmed_defect", "csrf": token}).status == 303
    # refused marks change nothing
    assert c.post("/review", {"id": ok["id"], "label": "false_reject", "csrf": token}).status == 400
    assert c.post("/review", {"id": 999999, "label": "confirmed_defect", "csrf": token}).status == 400
    assert c.post("/review", {"id": ngs[0]["id"], "label": "delete", "csrf": token}).status == 400
    assert query(tmp / "log.sqlite", "SELECT key, label FROM reviews ORDER BY t") == [
        (ngs[0]["key"], "false_reject"),
        (ngs[1]["key"], "confirmed_defect"),
    ]
    review = tmp / "review"
    good = list((review / "train" / "good").glob("*.png"))
    confirmed = list((review / "test" / "confirmed").glob("*.png"))
    assert len(good) == 1 and len(confirmed) == 1
    # the layout train / calibrate read
    from engines.data import eval_items, good_training_images

    assert good_training_images(review) == good
    assert [it.defect for it in eval_items(review)] == ["confirmed"]

    # what-if, computed here from the log by hand
    t = sorted(r["score"] for r in rows)[6]
    got = c.get(f"/api/whatif?threshold={t}").json()
    scored = [r for r in rows if r["score"] is not None]

    def rejected(r, thr):
        return r["score"] >= thr or json.loads(r["regions"]) != []

    assert got["parts"] == len(scored)
    assert got["rejected"] == sum(rejected(r, t) for r in scored)
    assert got["rejected_now"] == sum(rejected(r, svc.inspector.calibration.image_threshold) for r in scored)
    assert got["marked_false_rejects"] == 1 and got["confirmed_defects"] == 1
    assert got["false_rejects_still_rejected"] == int(rejected(ngs[0], t))
    assert got["confirmed_defects_passing"] == int(not rejected(ngs[1], t))
    # changing one's mind moves the file
    assert c.post("/review", {"id": ngs[0]["id"], "label": "confirmed_defect", "csrf": token}).status == 303
    assert not list((review / "train" / "good").glob("*.png"))
    assert len(list((review / "test" / "confirmed").glob("*.png"))) == 2
    audit = query(tmp / "log.sqlite", "SELECT action, user, outcome FROM audit ORDER BY id")
    # refused input never reaches the audit table (nothing was changed); each mark did
    assert [(a[0], a[1]) for a in audit] == [("mark_part", "alice")] * 3
    assert [a[2].split(":")[0] for a in audit] == ["false_reject", "confirmed_defect", "confirmed_defect"]


def test_the_page_escapes_text_from_outside(tmp_path, calibrated, broker, part_images):
    evil = "<script>alert(1)</script>"
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images), "part_id": {"prefix": evil}}]
    svc = _start(tmp_path, calibrated, broker, cams)
    try:
        assert until(lambda: sum(svc.counts.values()) == 12, 60)
        c = Client(svc.web.url)
        assert until(lambda: c.get("/api/verdicts").json()["total"] == 12, 20)
        page = c.get("/history").text
        assert evil not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        # the live view puts it in with textContent; the JSON carries it as data
        assert c.get("/api/status").json()["cameras"]["cam1"]["part_id"].startswith(evil)
        # a spreadsheet formula in a part id is not run by a spreadsheet
        assert "<script>" in c.get("/verdicts.csv").text
        r = c.get("/history?part_id=%3Cscript%3E")
        assert r.status == 200 and "12 part(s)" in r.text
        # LIKE wildcards are searched for literally
        assert "0 part(s)" in c.get("/history?part_id=%25%25").text
    finally:
        svc.shutdown()


def test_csv_cells_that_a_spreadsheet_would_run_are_defused():
    from edge_app.logview import csv_cell

    assert csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert csv_cell("@SUM(1)") == "'@SUM(1)"
    assert csv_cell("-1.5") == "-1.5"
    assert csv_cell("part-7") == "part-7"


def test_a_page_that_cannot_listen_leaves_the_line_inspecting(tmp_path, calibrated, broker, part_images):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images)}]
    svc = _start(tmp_path, calibrated, broker, cams, web={"port": busy.getsockname()[1]})
    try:
        assert svc.web is None
        assert until(lambda: sum(svc.counts.values()) == 12, 60)
        health = svc.check_health()
        assert not health.ok and not health.restart
        assert any(r.startswith("station page not served: cannot listen") for r in health.reasons)
        assert svc.metrics.get("health_degraded") == 1
    finally:
        svc.shutdown()
        busy.close()


def test_a_users_file_that_cannot_be_used_is_named(tmp_path, calibrated, broker, part_images):
    bad = tmp_path / "users"
    bad.write_text("alice\n")
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images)}]
    svc = _start(tmp_path, calibrated, broker, cams, web={"auth": {"users_file": str(bad)}})
    try:
        reasons = svc.check_health().reasons
        assert any(f"{bad} line 1: expected 'name:secret'" in r for r in reasons)
        assert until(lambda: sum(svc.counts.values()) == 12, 60)
    finally:
        svc.shutdown()


def test_stalled_and_excess_live_clients_do_not_hold_the_line(tmp_path, calibrated, broker, part_images):
    """Clients that connect to the live stream and never read, more than max_clients of them, and
    one that vanishes mid-stream: every part still gets its verdict, and the page still answers."""
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images), "loop": True, "rate_hz": 40}]
    svc = _start(tmp_path, calibrated, broker, cams, web={"max_clients": 3, "live_max_hz": 30})
    socks = []
    try:
        port = svc.web.port
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)  # never read
        c = Client(svc.web.url)
        assert until(lambda: svc.web.app.state.clients["n"] == 3, 10)
        r = c.get("/api/events")
        assert r.status == 503 and "too many live views" in r.text
        socks.pop().close()  # one vanishes
        start = sum(svc.counts.values())
        assert until(lambda: sum(svc.counts.values()) >= start + 100, 60)
        assert c.get("/api/status").status == 200
        rows = log_rows(tmp_path / "log.sqlite")
        assert len({r["key"] for r in rows}) == len(rows)
    finally:
        for s in socks:
            s.close()
        svc.shutdown()
    rows = log_rows(tmp_path / "log.sqlite")
    assert len(rows) == svc.metrics.get("frames_total", camera="cam1")


def test_the_page_served_over_tls_sets_a_secure_cookie(tmp_path, calibrated, broker, part_images):
    import ssl
    import subprocess
    import urllib.error
    import urllib.request

    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images)}]
    svc = _start(tmp_path, calibrated, broker, cams, web={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    try:
        assert svc.web.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(svc.web.url + "api/status", context=ctx, timeout=10) as r:
            assert r.status == 200
        # a plain-HTTP client gets nothing
        with pytest.raises(OSError):
            urllib.request.urlopen(svc.web.url.replace("https", "http") + "api/status", timeout=5).read()
        req = urllib.request.Request(
            svc.web.url + "login", data=f"user=alice&password={PASSWORD.replace(' ', '+')}".encode(), method="POST"
        )

        class Stop(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), Stop())
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(req, timeout=10)
        assert redirect.value.code == 303
        cookie = redirect.value.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    finally:
        svc.shutdown()


def test_the_page_crashing_leaves_the_line_inspecting_and_says_so(tmp_path, calibrated, broker, part_images):
    cams = [{"id": "cam1", "type": "folder", "path": str(part_images), "loop": True, "rate_hz": 30}]
    svc = _start(tmp_path, calibrated, broker, cams)
    try:
        c = Client(svc.web.url)
        assert c.get("/api/status").status == 200
        # a handler that raises: that request fails, the page and the line go on
        original = svc.web.station.snapshot
        svc.web.station.snapshot = lambda: 1 / 0
        assert c.get("/api/status").status == 500
        svc.web.station.snapshot = original
        assert c.get("/api/status").status == 200
        # the page's event loop dies under it
        svc.web.loop.call_soon_threadsafe(svc.web.loop.stop)
        assert until(lambda: not svc.web.thread.is_alive(), 10)
        start = sum(svc.counts.values())
        assert until(lambda: sum(svc.counts.values()) >= start + 30, 30)
        health = svc.check_health()
        assert not health.restart
        assert any(r.startswith("station page not served: RuntimeError") for r in health.reasons), health.reasons
    finally:
        svc.shutdown()
    rows = log_rows(tmp_path / "log.sqlite")
    assert len(rows) == svc.metrics.get("frames_total", camera="cam1")
