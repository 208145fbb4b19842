"""Names the machine a benchmark ran on (CPU model, cores, GPU when torch sees one); merges a
one-bundle script's entry into its results file."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = f"{cpu}, {os.cpu_count()} cores"
    gpu = os.environ.get("LINEINSPECT_GPU_NAME")
    return f"{name}, {gpu}" if gpu else name


def replace_result(path: Path, out: dict, key: Callable[[dict], tuple] | None = None) -> None:
    """Write ``out`` (one bundle on one data set) into the JSON list at ``path``, replacing the
    entry of the same bundle and data set (or of the same ``key(entry)``) and keeping the others."""
    key = key or (lambda r: (r["bundle"], r["data"]))
    old = json.loads(path.read_text()) if path.is_file() else []
    old = [r for r in old if key(r) != key(out)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*old, out], indent=1) + "\n")


def mark_defaults(rows: list[dict]) -> list[dict]:
    """Every row's ``"default"`` set again from its ``"network"`` record (``engines.train.is_shipped``):
    the rows of a network that is no longer the shipped default lose the mark, rows without a record
    (written before records were kept) have none."""
    from engines.train import is_shipped

    for r in rows:
        r["default"] = is_shipped(r.get("network"))
    return rows
