"""Facts about the machine a measurement ran on (benchmarks and `medssl bench` print and record them):
results are only comparable with the machine, its load and the library versions beside them."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def _ram_gib() -> float | None:
    try:
        kib = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        return None
    return round(int(kib) / 2**20, 1)


def machine_facts(packages: Iterable[str] = ()) -> dict:
    """CPU (model, family and model numbers, bf16 instructions), cores (logical and usable by this process), RAM,
    GPU, OS, Python, torch threads, the load average now, and the versions of torch, medssl and ``packages``."""
    fields = _cpuinfo()
    bf16 = sorted(set(fields.get("flags", "").split()) & {"avx512_bf16", "amx_bf16"})
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')}; bf16: {', '.join(bf16) or 'no'})"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable, "ram_gib": _ram_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(), "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {d: version(d) for d in ("torch", "medssl", *packages)},
    }
