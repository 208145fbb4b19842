"""DESIGN.md import rules: the service and calibration never import torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "edge_app",
        "edge_app.cli",
        "calibration",
        "engines",
        "engines.bundle",
        "engines.data",
        "engines.metrics",
        "engines.synthetic",
        "engines.evaluate",
        # the modules of the line service one by one (DESIGN.md: numpy in, numpy out)
        "edge_app.service",
        "edge_app.inspect",
        "edge_app.decide",
        "edge_app.store",
        "edge_app.outbox",
        "edge_app.publish",
        "edge_app.health",
        "edge_app.checks",
        "engines.runtime",
        "engines.runtime.ort",
        "engines.runtime.openvino",
        "calibration.stats",
        "calibration.wizard",
        "calibration.report",
        "calibration.whatif",
        # the station page
        "edge_app.live",
        "edge_app.logview",
        "edge_app.web",
        "edge_app.web.app",
        "edge_app.web.auth",
        "edge_app.web.station",
    ],
)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported by {module}'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
