"""Names the machine a benchmark ran on (CPU model, cores, GPU when torch sees one)."""

from __future__ import annotations

import os
import platform


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
