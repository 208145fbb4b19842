"""Station-page parts that need no model: passwords and sessions, the what-if rule, the log view."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from calibration.whatif import check_threshold, what_if
from edge_app.config import WebAuthConfig
from edge_app.web.auth import AuthError, Sessions, check_password, hash_password, load_users, main_web_password


def test_hashes_check_the_password_and_nothing_else():
    h = hash_password("s3cret pass", params=(2**10, 8, 1))
    assert h.startswith("scrypt$1024$8$1$") and "s3cret" not in h
    assert check_password("s3cret pass", h)
    assert not check_password("s3cret pas", h)
    assert not check_password("", h)
    assert h != hash_password("s3cret pass", params=(2**10, 8, 1))  # salted
    assert check_password("plain", "plain") and not check_password("plain2", "plain")  # discouraged plain secret
    assert not check_password("x", "scrypt$broken")
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_users_come_from_a_file_or_a_systemd_credential(tmp_path, monkeypatch):
    f = tmp_path / "users"
    f.write_text("# comment\n\nalice:" + hash_password("a", params=(2**10, 8, 1)) + "\nbob:plainpw\n")
    users = load_users(WebAuthConfig(users_file=f))
    assert sorted(users) == ["alice", "bob"]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert load_users(WebAuthConfig(users_credential="users")) == users
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ValueError, match="CREDENTIALS_DIRECTORY is not"):
        load_users(WebAuthConfig(users_credential="users"))
    f.write_text("alice\n")
    with pytest.raises(ValueError, match="line 1: expected 'name:secret'"):
        load_users(WebAuthConfig(users_file=f))
    f.write_text("# nobody\n")
    with pytest.raises(ValueError, match="names no user"):
        load_users(WebAuthConfig(users_file=f))
    with pytest.raises(ValueError, match="cannot read"):
        load_users(WebAuthConfig(users_file=tmp_path / "missing"))
    assert load_users(WebAuthConfig()) == {}
    with pytest.raises(ValueError, match="not both"):
        WebAuthConfig(users_file=f, users_credential="x")


def test_sessions_lock_out_guessing_and_expire():
    cfg = WebAuthConfig(max_failures=2, lockout_s=30, session_hours=1)
    s = Sessions(cfg, {"alice": hash_password("pw", params=(2**10, 8, 1))})
    with pytest.raises(AuthError, match="wrong user name or password"):
        s.login("alice", "nope", "10.0.0.9")
    with pytest.raises(AuthError, match="wrong user name or password"):
        s.login("mallory", "pw", "10.0.0.9")  # an unknown user reads the same
    with pytest.raises(AuthError, match="too many wrong passwords"):
        s.login("alice", "pw", "10.0.0.9")  # even the right password waits now
    ok = s.login("alice", "pw", "10.0.0.8")  # another address is not locked
    assert s.get(ok.token) == ok and ok.user == "alice"
    assert Sessions.csrf_ok(ok, ok.csrf) and not Sessions.csrf_ok(ok, "x") and not Sessions.csrf_ok(ok, None)
    object.__setattr__(ok, "expires", time.time() - 1)
    assert s.get(ok.token) is None
    assert s.get("made-up") is None and s.get(None) is None
    with pytest.raises(AuthError, match="no user may change"):
        Sessions(cfg, {}).login("alice", "pw", "x")


def test_web_password_prints_a_line_the_users_file_takes(tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hunter2 is long\n"))

    class Args:
        name = "carol"

    assert main_web_password(Args()) == 0
    line = capsys.readouterr().out.strip()
    (tmp_path / "u").write_text(line + "\n")
    users = load_users(WebAuthConfig(users_file=tmp_path / "u"))
    assert check_password("hunter2 is long", users["carol"])


@dataclass(frozen=True)
class P:
    score: float
    has_region: bool = False
    review: str | None = None


def test_what_if_counts_by_hand():
    recent = [P(1.0), P(2.0), P(3.0), P(4.0, review="false_reject"), P(0.5, has_region=True), P(5.0)]
    reviewed = [P(4.0, review="false_reject"), P(2.5, review="confirmed_defect"), P(6.0, review="confirmed_defect")]
    w = what_if(3.5, 3.0, recent, reviewed)
    # at 3.5: 4.0, 5.0 and the region part -> 3 of 6; at 3.0 also 3.0 -> 4
    assert (w.parts, w.rejected, w.rejected_now) == (6, 3, 4)
    assert w.reject_rate == pytest.approx(0.5)
    assert (w.marked_false_rejects, w.false_rejects_still_rejected) == (1, 1)
    assert (w.confirmed_defects, w.confirmed_defects_passing) == (2, 1)  # 2.5 passes at 3.5
    w = what_if(4.5, 3.0, recent, reviewed)
    assert (w.rejected, w.false_rejects_still_rejected, w.confirmed_defects_passing) == (2, 0, 1)
    for bad in (float("nan"), float("inf"), 0.0, -1.0, 1e7, True):
        with pytest.raises(ValueError):
            check_threshold(bad)
    assert what_if(1.0, 1.0, [], []).reject_rate == 0.0


def test_a_hand_set_threshold_keeps_the_model_binding_and_the_old_file(tmp_path):
    from calibration.calibfile import (
        Calibration,
        CalibrationError,
        load_calibration,
        replace_calibration,
        save_calibration,
        with_image_threshold,
    )

    sha = "a" * 64
    old = Calibration(sha, 2.0, 1.5, 10, {"image": {"method": "gpd"}}, {}, {"target": 0.01}, "t0",
                      {"good_scores": [1.0, 1.5, 1.9, 2.1]})  # fmt: skip
    path = save_calibration(old, tmp_path / "cal.yaml")
    new = with_image_threshold(old, 1.8, "alice", "t1")
    assert new.expected_false_reject_rate["estimate"] == pytest.approx(0.5)  # 1.9 and 2.1 of 4
    assert new.method["image"]["set_by"] == "alice" and new.method["image"]["replaces"]["threshold"] == 2.0
    kept = replace_calibration(new, path, sha)
    assert kept == tmp_path / f"cal.{old.id}.yaml" and load_calibration(kept).id == old.id
    assert load_calibration(path, sha).image_threshold == 1.8
    with pytest.raises(CalibrationError, match="another model"):
        replace_calibration(new, path, "b" * 64)
    assert load_calibration(path).id == new.id
    bare = Calibration(sha, 2.0, 1.5, 10, {}, {}, {"estimate": 0.01, "target": 0.01}, "t0")
    assert "estimate" not in with_image_threshold(bare, 1.0, "bob", "t2").expected_false_reject_rate
    assert not list(Path(tmp_path).glob(".*new"))
