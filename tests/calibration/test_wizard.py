"""The calibration wizard, by flags and through its prompts in a real pseudo-terminal."""

import contextlib
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import yaml
from pexpect import fdpexpect

from edge_app.cli import main

ROOT = Path(__file__).parents[2]


class Terminal:
    """``lineinspect calibrate`` on a real pseudo-terminal, driven with pexpect.

    The child is started by ``subprocess`` (vfork / exec) on a pty opened here rather than by
    ``pexpect.spawn``, which forks this test process: after the engines tests the process holds
    torch / OpenVINO / OpenMP thread pools, and a child forked from it died of SIGSEGV before it
    could exec (seen in /work/main's engines-then-calibration sequence).
    """

    def __init__(self, args: list[str]):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_app.cli", "calibrate", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            start_new_session=True,
        )
        os.close(slave)
        # per prompt: scoring the parts took over 120 s beside a benchmark on 2 cores
        self.child = fdpexpect.fdspawn(master, encoding="utf-8", timeout=300)

    def expect(self, pattern) -> None:
        """Wait for ``pattern``; when the wizard ends or stalls first, fail with what it printed and
        how it ended (exit status, or the signal as a negative number)."""
        try:
            self.child.expect(pattern)
        except (pexpect.EOF, pexpect.TIMEOUT) as exc:
            self.proc.kill()
            pytest.fail(
                f"waiting for {pattern!r}: {type(exc).__name__}; exit status {self.proc.wait()}; "
                f"output so far:\n{self.child.before}"
            )

    def sendline(self, text: str) -> None:
        self.child.sendline(text)

    def exit_status(self) -> int:
        """After the wizard's last line: wait for its end (EOF on the terminal), its exit status."""
        self.expect(pexpect.EOF)
        rc = self.proc.wait(timeout=60)
        self.child.close()
        return rc

    def close(self) -> None:
        """Kill the wizard's process group if it still runs (a test failed before its end), close the pty."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        if not self.child.closed:
            self.child.close()


@pytest.fixture
def terminal():
    """Start ``Terminal``s; each is killed and closed at teardown, whether the test passed or not."""
    started: list[Terminal] = []

    def start(args: list[str]) -> Terminal:
        started.append(Terminal(args))
        return started[-1]

    yield start
    for t in started:
        t.close()


@pytest.fixture(scope="module")
def good_parts(tmp_path_factory) -> Path:
    from engines.synthetic import make_dataset

    root = make_dataset(
        tmp_path_factory.mktemp("calparts") / "ds", n_train=70, n_test_good=2, n_test_per_defect=6, size=128, seed=7
    )
    return root


def test_calibrate_by_flags_writes_file_and_report(tmp_path, exported_bundle, good_parts, capsys):
    out = tmp_path / "cal.yaml"
    code = main(
        [
            "calibrate",
            "--bundle",
            str(exported_bundle),
            "--good",
            str(good_parts / "train" / "good"),
            "--defects",
            str(good_parts),
            "--alpha",
            "0.01",
            "--yes",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    cal = yaml.safe_load(out.read_text())
    import json

    meta = json.loads((exported_bundle / "model.json").read_text())
    assert cal["model_onnx_sha256"] == meta["onnx"]["sha256"]
    assert cal["method"]["image"]["method"] == "gpd"  # 70 parts < 299 needed for alpha 1% distribution-free
    assert cal["samples"]["n_good"] == 70 and cal["samples"]["n_defect"] == 18
    frr = cal["expected_false_reject_rate"]
    assert frr["lower"] <= frr["estimate"] <= frr["upper"] and frr["target"] == 0.01
    assert len(cal["extra"]["good_scores"]) == 70
    assert "miss rate" in text and "zero-miss threshold" in text and "rule: gpd" in text
    html = out.with_suffix(".html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # histogram, ROC, example heatmaps
    import base64
    import re

    srcs = re.findall(r"<img[^>]* src='([^']*)'", html)
    assert len(srcs) >= 4
    for src in srcs:  # every picture is a real PNG (the plots once carried a numpy array's text)
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Highest-scoring good parts" in html
    # the service side reads it and binds it to the model
    from calibration.calibfile import load_calibration

    loaded = load_calibration(out, meta["onnx"]["sha256"])
    assert loaded.image_threshold == cal["thresholds"]["image_score"]


def test_calibrate_refuses_too_few_parts(tmp_path, exported_bundle, synthetic_root, capsys):
    few = tmp_path / "few"
    few.mkdir()
    import shutil

    for p in sorted((synthetic_root / "train" / "good").iterdir())[:12]:
        shutil.copy(p, few / p.name)
    code = main(
        [
            "calibrate",
            "--bundle",
            str(exported_bundle),
            "--good",
            str(few),
            "--yes",
            "--alpha",
            "0.001",
            "--out",
            str(tmp_path / "c.yaml"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "12 good parts are too few: at least 50 are needed (2995" in err
    assert not (tmp_path / "c.yaml").exists()


def test_interactive_wizard_in_a_terminal(tmp_path, exported_bundle, good_parts, terminal):
    out = tmp_path / "cal.yaml"
    child = terminal(["--bundle", str(exported_bundle), "--out", str(out)])
    child.expect("good parts: a folder of images")
    child.sendline(str(good_parts / "train" / "good"))
    child.expect("target false-reject rate alpha")
    child.sendline("0.02")
    child.expect("good parts: \\[")  # the live progress bar
    child.expect("folder of defect images")
    child.sendline("")
    child.expect("proposed image threshold")
    child.expect("accept and write the calibration")
    child.sendline("y")
    child.expect("written to")
    assert child.exit_status() == 0
    cal = yaml.safe_load(out.read_text())
    assert cal["expected_false_reject_rate"]["target"] == 0.02


def test_interactive_wizard_can_decline(tmp_path, exported_bundle, good_parts, terminal):
    out = tmp_path / "cal.yaml"
    child = terminal(
        [
            *("--bundle", str(exported_bundle), "--good", str(good_parts / "train" / "good")),
            *("--alpha", "0.05", "--out", str(out)),
        ]
    )
    child.expect("folder of defect images")
    child.sendline("")
    child.expect("accept and write the calibration")
    child.sendline("n")
    child.expect("not written")
    assert child.exit_status() == 1
    assert not out.exists()


def test_drift_command(tmp_path, exported_bundle, good_parts, capsys):
    out = tmp_path / "cal.yaml"
    assert (
        main(
            [
                "calibrate",
                "--bundle",
                str(exported_bundle),
                "--good",
                str(good_parts / "train" / "good"),
                "--alpha",
                "0.05",
                "--yes",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    # the same good parts: no drift
    assert (
        main(
            [
                "drift",
                "--bundle",
                str(exported_bundle),
                "--calibration",
                str(out),
                "--good",
                str(good_parts / "train" / "good"),
            ]
        )
        == 0
    )
    # defective parts presented as "good": the distribution moved
    code = main(
        [
            "drift",
            "--bundle",
            str(exported_bundle),
            "--calibration",
            str(out),
            "--good",
            str(good_parts / "test" / "scratch"),
        ]
    )
    assert code == 3 and "RECALIBRATION DUE" in capsys.readouterr().out


def test_calibration_records_the_arithmetic_it_was_scored_with(tmp_path, exported_bundle, good_parts, capsys):
    """Backend and precision go into the file, so a station running another precision can say so."""
    out = tmp_path / "cal.yaml"
    args = ["calibrate", "--bundle", str(exported_bundle), "--good", str(good_parts / "train" / "good")]
    args += ["--alpha", "0.01", "--yes", "--out", str(out), "--backend", "openvino", "--precision", "bf16"]
    code = main(args)
    assert code == 0, capsys.readouterr().out
    samples = yaml.safe_load(out.read_text())["samples"]
    assert samples["backend"] == "openvino" and samples["device"] == "cpu (bf16)"
