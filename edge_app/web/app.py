"""The station page: Starlette routes over the ``Station`` facade.

Read-only pages and APIs are open to whoever reaches the bind address; every change (threshold
apply, pause / resume, marking parts) needs a login session and its CSRF token, and is written to
the audit table before it is made. No page does image work on the line's thread: live pictures
are drawn on request from the ``LiveBoard``, at most once per verdict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.parse
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from calibration.whatif import what_if
from edge_app.config import WebConfig
from edge_app.logview import VERDICTS, Query, QueryError
from edge_app.store import REVIEW_LABELS, StoreError
from edge_app.web.auth import COOKIE, AuthError, Session, Sessions
from edge_app.web.station import Station

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
DONE = {  # the only texts a redirect may ask a page to show (never text from the URL)
    "applied": "New threshold applied and loaded.",
    "paused": "Inspection paused: every part is sent as not_inspected (paused) until resumed.",
    "resumed": "Inspection resumed.",
    "marked": "Part marked.",
    "login": "Logged in.",
    "logout": "Logged out.",
}


class BadInputError(ValueError):
    """A form or API field that cannot be used: 400 with this message, nothing changed."""


def _num(value: str | None, name: str, default: float | None = None) -> float | None:
    if value is None or value == "":
        return default
    try:
        v = float(value)
    except ValueError:
        raise BadInputError(f"{name} must be a number (got {value[:40]!r})") from None
    if not math.isfinite(v):
        raise BadInputError(f"{name} must be a finite number")
    return v


def _int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        v = int(value)
    except ValueError:
        raise BadInputError(f"{name} must be a whole number (got {value[:40]!r})") from None
    if not lo <= v <= hi:
        raise BadInputError(f"{name} must be between {lo} and {hi}")
    return v


def _time(value: str | None, name: str) -> float | None:
    """A time field: ISO 8601 (2026-12-01T08:00, local time) or seconds since 1970."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise BadInputError(f"{name} must be a time like 2026-12-01T08:00 (got {value[:40]!r})") from None


def _fmt_time(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _local(path: str | None, default: str, prefix: str = "/") -> str:
    """A redirect target from a form or a URL: a path on this page under ``prefix``, else ``default``
    (never another site: "//host" is refused)."""
    return path if path and path.startswith(prefix) and not path.startswith("//") else default


def _with_done(path: str, code: str) -> str:
    """``path`` asking its page to show one of the fixed ``DONE`` texts."""
    return f"{path}{'&' if '?' in path else '?'}done={code}"


def query_from(params) -> Query:
    verdict = params.get("verdict") or None
    if verdict is not None and verdict not in VERDICTS:
        raise BadInputError(f"verdict must be one of {', '.join(VERDICTS)}")
    try:
        return Query(
            part_id=(params.get("part_id") or "").strip(),
            t_from=_time(params.get("from"), "from"),
            t_to=_time(params.get("to"), "to"),
            verdict=verdict,
            page=_int(params.get("page"), "page", 1, 1, 10**9),
            per_page=_int(params.get("per_page"), "per_page", 50, 1, 500),
        )
    except QueryError as exc:
        raise BadInputError(str(exc)) from exc


def make_app(station: Station, cfg: WebConfig, sessions: Sessions) -> Starlette:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["t"] = _fmt_time
    clients = {"n": 0}
    secure_cookie = cfg.tls is not None
    latest = {"key": None, "json": ""}  # the live payload, shared by every open page

    def live_json() -> str:
        """The live stream's payload as JSON, built once per new verdict and at most once a second,
        however many pages are open (the rates and percentiles are not recomputed per client)."""
        key = (station.board.version, int(time.monotonic()))
        if latest["key"] != key:
            latest["json"] = json.dumps(_live_payload(station))
            latest["key"] = key
        return latest["json"]

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        s = session_of(request)
        done = DONE.get(request.query_params.get("done", ""))
        body = env.get_template(name).render(
            station=station.name,
            user=s.user if s else None,
            csrf=s.csrf if s else "",
            done=done,
            path=request.url.path,
            **ctx,
        )
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)

    def error(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": False, "error": message}, status_code=status, headers=SECURITY_HEADERS)
        return page(request, "error.html", status=status, message=message)

    async def form_of(request: Request) -> dict[str, str]:
        """An urlencoded form or a JSON object, as strings (no multipart: nothing here uploads files)."""
        body = await request.body()
        if len(body) > 64 * 1024:
            raise BadInputError("request too large")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                raise BadInputError("the request body is not JSON") from None
            if not isinstance(data, dict):
                raise BadInputError("the request body must be a JSON object")
            return {str(k): "" if v is None else str(v) for k, v in data.items()}
        try:
            pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise BadInputError("the form is not UTF-8") from None
        return dict(pairs)

    async def change(request: Request, action: str, fn) -> Response:
        """The one gate for every change: session, CSRF token, audit row, then the change."""
        s = session_of(request)
        if s is None:
            return error(request, 401, "log in first: changing the station needs a login")
        try:
            form = await form_of(request)
        except BadInputError as exc:
            return error(request, 400, str(exc))
        if not sessions.csrf_ok(s, request.headers.get("x-csrf-token") or form.get("csrf")):
            return error(request, 403, "the form's security token is missing or stale: reload the page and try again")
        remote = request.client.host if request.client else "?"
        try:
            detail, run = fn(form, s)
        except BadInputError as exc:
            return error(request, 400, str(exc))
        try:
            audit_id = station.audit(s.user, remote, action, detail)
        except StoreError as exc:
            return error(request, 503, f"nothing changed: the audit row cannot be written ({exc})")

        def finish(outcome: str) -> None:
            try:
                station.audit_outcome(audit_id, outcome)
            except StoreError:
                log.warning("audit row %d: outcome not written (%s)", audit_id, outcome)

        try:
            outcome, redirect = await asyncio.to_thread(run)
        except (BadInputError, ValueError) as exc:
            finish(f"refused: {exc}")
            return error(request, 400, str(exc))
        except (StoreError, OSError) as exc:
            finish(f"failed: {exc}")
            return error(request, 503, f"failed: {exc}")
        finish(outcome)
        if request.headers.get("x-csrf-token") or request.headers.get("content-type", "").startswith(
            "application/json"
        ):
            return JSONResponse({"ok": True, "outcome": outcome, "audit_id": audit_id}, headers=SECURITY_HEADERS)
        return RedirectResponse(redirect, status_code=303)

    # --- pages ------------------------------------------------------------------------------
    async def live(request: Request) -> Response:
        return page(request, "live.html", cameras=station.camera_ids(), max_hz=cfg.live_max_hz)

    async def search(request: Request):
        """The history search of a request: (query, page) or the error response to send."""
        try:
            q = query_from(request.query_params)
            return q, await asyncio.to_thread(station.log.search, q)
        except BadInputError as exc:
            return error(request, 400, str(exc))
        except StoreError as exc:
            return error(request, 503, str(exc))

    async def history(request: Request) -> Response:
        found = await search(request)
        if isinstance(found, Response):
            return found
        _, result = found
        params = {k: v for k, v in request.query_params.items() if k in ("part_id", "from", "to", "verdict")}
        shown = {}  # row id -> the archived picture to show (heatmap, else the image), None when not archived
        for r in result.rows:
            if r.verdict != "ok":
                image, heat = station.archived(r)
                shown[r.id] = "heat" if heat.is_file() else "image" if image.is_file() else None
        return page(
            request,
            "history.html",
            result=result,
            params=params,
            qs=urllib.parse.urlencode(params),
            verdicts=VERDICTS,
            labels=REVIEW_LABELS,
            shown=shown,
        )

    async def whatif_of(request: Request, param: str, label: str, required: bool):
        """(calibration, n, recent parts, what-if or None) for a request, or the error response to send."""
        cal = station.calibration()
        try:
            n = _int(request.query_params.get("n"), "n", cfg.whatif_parts, 10, 1_000_000)
            t = _num(request.query_params.get(param), label)
            if t is None and required:
                raise BadInputError(f"give {param}")
            recent = await asyncio.to_thread(station.log.recent_scored, n)
            reviewed = await asyncio.to_thread(station.log.reviewed)
            return cal, n, recent, what_if(t, cal.image_threshold, recent, reviewed) if t is not None else None
        except (BadInputError, ValueError) as exc:
            return error(request, 400, str(exc))
        except StoreError as exc:
            return error(request, 503, str(exc))

    async def calibration(request: Request) -> Response:
        found = await whatif_of(request, "whatif", "whatif threshold", required=False)
        if isinstance(found, Response):
            return found
        cal, n, recent, result = found
        drift = _drift(cal, recent)
        return page(
            request,
            "calibration.html",
            cal=cal,
            method=_method_text(cal),
            file=str(station.calibration_file()),
            n=n,
            recent_scores=[round(p.score, 5) for p in recent],
            whatif=result,
            whatif_value=request.query_params.get("whatif", ""),
            drift=drift,
            audit=await asyncio.to_thread(station.log.audit, 20),
        )

    async def model(request: Request) -> Response:
        info = await asyncio.to_thread(station.model)
        return page(request, "model.html", m=info)

    async def login_page(request: Request) -> Response:
        return page(request, "login.html", next=_local(request.query_params.get("next"), "/"))

    async def login(request: Request) -> Response:
        try:
            form = await form_of(request)
        except BadInputError as exc:
            return error(request, 400, str(exc))
        remote = request.client.host if request.client else "?"
        try:
            s = await asyncio.to_thread(sessions.login, form.get("user", ""), form.get("password", ""), remote)
        except AuthError as exc:
            log.warning("page login refused for %r from %s: %s", form.get("user", "")[:40], remote, exc)
            return page(request, "login.html", status=401, message=str(exc), next=form.get("next", "/"))
        resp = RedirectResponse(_with_done(_local(form.get("next"), "/"), "login"), status_code=303)
        resp.set_cookie(
            COOKIE,
            s.token,
            max_age=int(cfg.auth.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=secure_cookie,
            path="/",
        )
        log.info("page login: %s from %s", s.user, remote)
        return resp

    async def logout(request: Request) -> Response:
        s = session_of(request)
        if s is not None:
            form = await form_of(request)
            if not sessions.csrf_ok(s, request.headers.get("x-csrf-token") or form.get("csrf")):
                return error(request, 403, "the form's security token is missing or stale")
            sessions.logout(s.token)
        resp = RedirectResponse("/?done=logout", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # --- changes ------------------------------------------------------------------------------
    async def apply(request: Request) -> Response:
        def prepare(form: dict[str, str], s: Session):
            t = _num(form.get("threshold"), "threshold")
            if t is None:
                raise BadInputError("give the new threshold")
            from calibration.whatif import check_threshold

            try:
                t = check_threshold(t)
            except ValueError as exc:
                raise BadInputError(str(exc)) from exc
            old = station.calibration()
            detail = {"threshold": t, "previous_threshold": old.image_threshold, "previous_calibration": old.id}

            def run():
                res = station.apply_threshold(t, s.user)
                if not res.ok:
                    raise ValueError(res.message)
                return (
                    f"applied: calibration {res.calibration_id} (old file kept as {res.kept})",
                    "/calibration?done=applied",
                )

            return detail, run

        return await change(request, "apply_threshold", prepare)

    async def pause(request: Request) -> Response:
        return await change(request, "pause", lambda f, s: ({}, lambda: (station.pause() or "paused", "/?done=paused")))

    async def resume(request: Request) -> Response:
        return await change(
            request, "resume", lambda f, s: ({}, lambda: (station.resume() or "resumed", "/?done=resumed"))
        )

    async def review(request: Request) -> Response:
        def prepare(form: dict[str, str], s: Session):
            label = form.get("label", "")
            if label not in REVIEW_LABELS:
                raise BadInputError(f"label must be one of {', '.join(REVIEW_LABELS)}")
            row_id = _int(form.get("id"), "id", 0, 1, 2**62)
            row = station.log.get(row_id)
            if row is None:
                raise BadInputError(f"no logged part with id {row_id}")
            if row.verdict == "ok" and label == "false_reject":
                raise BadInputError("an ok part cannot be a false reject")
            back = _local(form.get("back"), "/history", prefix="/history")

            def run():
                dest = station.mark(row, label, s.user)
                return f"{label}: {row.key}" + (f" -> {dest}" if dest else " (no archived image)"), _with_done(
                    back, "marked"
                )

            return {"id": row_id, "key": row.key, "label": label, "verdict": row.verdict}, run

        return await change(request, "mark_part", prepare)

    # --- data ----------------------------------------------------------------------------------
    async def api_status(request: Request) -> Response:
        payload = await asyncio.to_thread(_live_payload, station)  # fresh: a script asks right after a change
        return JSONResponse(payload, headers=SECURITY_HEADERS)

    async def api_verdicts(request: Request) -> Response:
        found = await search(request)
        if isinstance(found, Response):
            return found
        q, result = found
        return JSONResponse(
            {
                "total": result.total,
                "page": q.page,
                "pages": result.pages,
                "rows": [
                    {
                        "id": r.id,
                        "key": r.key,
                        "part_id": r.part_id,
                        "camera_id": r.camera_id,
                        "verdict": r.verdict,
                        "reason": r.reason,
                        "score": r.score,
                        "threshold": r.threshold,
                        "t_decided": r.t_decided,
                        "review": result.reviews.get(r.key),
                    }
                    for r in result.rows
                ],
            },
            headers=SECURITY_HEADERS,
        )

    async def csv_export(request: Request) -> Response:
        try:
            q = query_from(request.query_params)
        except BadInputError as exc:
            return error(request, 400, str(exc))
        name = f"lineinspect-{station.name.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        return StreamingResponse(
            _iterate_in_thread(station.log.csv_chunks(q)),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "X-Content-Type-Options": "nosniff"},
        )

    async def api_whatif(request: Request) -> Response:
        found = await whatif_of(request, "threshold", "threshold", required=True)
        if isinstance(found, Response):
            return found
        w = found[3]
        return JSONResponse(
            {**w.__dict__, "reject_rate": w.reject_rate, "reject_rate_now": w.reject_rate_now}, headers=SECURITY_HEADERS
        )

    async def live_picture(request: Request) -> Response:
        cam = request.path_params["camera"]
        pic = await asyncio.to_thread(station.board.picture, cam)
        if pic is None:
            return PlainTextResponse("no inspected frame yet", status_code=404)
        return Response(pic[1], media_type="image/jpeg", headers={"Cache-Control": "no-store", "X-Verdict-Key": pic[0]})

    async def archived(request: Request) -> Response:
        row_id = request.path_params["row_id"]
        kind = request.path_params["kind"]
        row = await asyncio.to_thread(station.log.get, row_id)
        if row is None or kind not in ("image", "heat"):
            return PlainTextResponse("not found", status_code=404)
        image, heat = station.archived(row)
        path = image if kind == "image" else heat
        if not path.is_file():
            return PlainTextResponse("not archived (or deleted by the archive quota)", status_code=404)
        return FileResponse(path, media_type="image/png")

    async def events(request: Request) -> Response:
        if clients["n"] >= cfg.max_clients:
            return PlainTextResponse(f"too many live views open ({cfg.max_clients}, web.max_clients)", status_code=503)
        period = 1.0 / cfg.live_max_hz

        async def stream():
            clients["n"] += 1
            try:
                seen = -1
                last_sent = 0.0
                while True:
                    now = time.monotonic()
                    if station.board.version != seen or now - last_sent > 5.0:
                        seen = station.board.version
                        yield f"data: {await asyncio.to_thread(live_json)}\n\n"
                        last_sent = now
                    await asyncio.sleep(period)
            finally:
                clients["n"] -= 1

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [
        Route("/", live),
        Route("/history", history),
        Route("/calibration", calibration),
        Route("/model", model),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/calibration/apply", apply, methods=["POST"]),
        Route("/pause", pause, methods=["POST"]),
        Route("/resume", resume, methods=["POST"]),
        Route("/review", review, methods=["POST"]),
        Route("/verdicts.csv", csv_export),
        Route("/api/status", api_status),
        Route("/api/verdicts", api_verdicts),
        Route("/api/whatif", api_whatif),
        Route("/api/events", events),
        Route("/live/{camera}.jpg", live_picture),
        Route("/archive/{row_id:int}/{kind}", archived),
        Route("/healthz", healthz),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.clients = clients
    return app


async def _iterate_in_thread(it):
    """A blocking iterator (SQLite reads) served without blocking the event loop."""
    sentinel = object()
    while True:
        chunk = await asyncio.to_thread(next, it, sentinel)
        if chunk is sentinel:
            return
        yield chunk


def _method_text(cal) -> str:
    m = cal.method.get("image")
    if isinstance(m, dict):
        text = str(m.get("method", ""))
        if m.get("alpha") is not None:
            text += f" at alpha {float(m['alpha']):.3%}"
        if m.get("set_by"):
            text += f", set by {m['set_by']}"
        return text
    return "" if m is None else str(m)


def _drift(cal, recent) -> dict[str, Any] | None:
    """The calibration's drift check (KS) on the recent parts that passed, against the calibration's
    good parts below the same threshold: both samples cut at the threshold alike, so that the
    defects on the line do not read as drift."""
    import numpy as np

    from calibration.stats import drift_check

    thr = cal.image_threshold
    ref = np.asarray(cal.extra.get("good_scores") or [], np.float64)
    ref = ref[ref < thr]
    new = np.asarray([p.score for p in recent if p.verdict == "ok" and p.review != "confirmed_defect"], np.float64)
    if len(ref) < 10 or len(new) < 30:
        return None
    return drift_check(ref, new, thr, float(cal.expected_false_reject_rate.get("upper", 1) or 1))


def _live_payload(station: Station) -> dict[str, Any]:
    snap = station.snapshot()
    latest = station.board.latest()
    cams = {}
    for cam in station.camera_ids():
        f = latest.get(cam)
        if f is None:
            cams[cam] = None
            continue
        v = f.verdict
        cams[cam] = {
            "key": v.key,
            "part_id": v.part_id,
            "verdict": v.verdict,
            "reason": v.reason,
            "score": v.score,
            "threshold": v.threshold,
            "regions": len(v.regions),
            "t_decided": v.t_decided,
            "frame": f.seq_no,
        }
    recent = station.board.recent(300)
    return {
        "snapshot": snap.__dict__,
        "cameras": cams,
        "trend": [[round(p.t_decided, 3), p.score, p.verdict] for p in recent if p.score is not None],
        "last": [
            {"part_id": p.part_id, "verdict": p.verdict, "reason": p.reason, "score": p.score, "camera": p.camera_id}
            for p in recent[-12:]
        ][::-1],
    }
