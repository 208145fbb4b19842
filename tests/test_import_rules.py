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
    ],
)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported by {module}'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
