"""deploy/: the systemd unit lints clean, install.sh is idempotent (dry run and a throwaway root)."""

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "deploy" / "systemd" / "lineinspect@.service"
INSTALL = ROOT / "deploy" / "install.sh"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_verifies_without_unknown_keys(tmp_path):
    inst = tmp_path / "lineinspect@press3.service"
    shutil.copy(UNIT, inst)
    res = subprocess.run(["systemd-analyze", "verify", str(inst)], capture_output=True, text=True)
    problems = [
        line
        for line in res.stderr.splitlines()
        # offline there is no venv at /opt/lineinspect: that is the only acceptable complaint
        if line.strip() and "is not executable" not in line
    ]
    assert problems == [], "\n".join(problems)


def test_unit_has_the_line_settings():
    text = UNIT.read_text()
    for key in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartSec=",
        "User=lineinspect",
        "LoadCredential=mqtt-password:",
        "StateDirectory=",
        "LogsDirectory=",
        "DeviceAllow=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StartLimitBurst=",
    ):
        assert key in text, key
    assert "PrivateDevices=yes" not in text  # cameras and GPUs must stay reachable


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=120)


def test_dry_run_prints_every_action_and_changes_nothing(tmp_path):
    target = tmp_path / "root"
    target.mkdir()
    res = run_install("--station", "press3", "--dry-run", "--root", str(target))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for action in (
        "install -d -m 0755",
        "/opt/lineinspect/venv",
        "69-lineinspect-basler.rules",
        "/etc/lineinspect/press3.yaml",
        "lineinspect@.service",
        "pip install",
    ):
        assert action in out, action
    assert all(line.startswith(("would:", "ok:", "platform:", "edit ", "put ", "done")) for line in out.splitlines())
    assert list(target.iterdir()) == [], "a dry run changes nothing"


def test_install_into_a_throwaway_root_is_idempotent(tmp_path):
    target = tmp_path / "root"
    target.mkdir()
    first = run_install("--station", "press3", "--root", str(target), "--skip-venv")
    assert first.returncode == 0, first.stderr
    conf = target / "etc/lineinspect/press3.yaml"
    assert conf.read_text() == (ROOT / "deploy/config.example.yaml").read_text()
    assert stat.S_IMODE((target / "etc/lineinspect/credentials").stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "etc/lineinspect/credentials/press3.mqtt-password").stat().st_mode) == 0o600
    assert (target / "etc/systemd/system/lineinspect@.service").read_text() == UNIT.read_text()
    assert (target / "etc/udev/rules.d/69-lineinspect-basler.rules").is_file()
    assert "lineinspect:x:" in (target / "etc/passwd").read_text()
    conf.write_text("# edited by the plant\n")
    second = run_install("--station", "press3", "--root", str(target), "--skip-venv")
    assert second.returncode == 0, second.stderr
    assert "+ " not in second.stdout, f"second run changed something:\n{second.stdout}"
    assert conf.read_text() == "# edited by the plant\n", "an existing station config is never overwritten"
    assert (target / "etc/passwd").read_text().count("lineinspect:x:") == 1


def test_install_refuses_bad_arguments():
    assert run_install().returncode == 2
    res = run_install("--station", "a b")
    assert res.returncode == 2 and "bad characters" in res.stderr
