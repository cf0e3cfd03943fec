"""Facts about the machine a benchmark ran on, printed at the top of its output (results are only
comparable with the machine, its load and the library versions beside them)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _first_field(path: str, prefix: str) -> str | None:
    try:
        return next((ln.split(":", 1)[1].strip() for ln in Path(path).read_text().splitlines()
                     if ln.startswith(prefix)), None)
    except OSError:
        return None


def machine_facts() -> dict:
    """CPU model, cores (logical and usable by this process), RAM, OS, Python and the load average now."""
    memory_kib = _first_field("/proc/meminfo", "MemTotal:")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _first_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(), "usable_cores": usable,
        "ram_gib": round(int(memory_kib.split()[0]) / 2**20, 1) if memory_kib else None,
        "os": platform.platform(), "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
