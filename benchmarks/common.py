"""What both benchmark scripts print about the machine, and how they read memory."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import resource
import shlex
import sys
import warnings
from pathlib import Path

import torch


def quiet() -> None:
    """No progress bars or library warnings between the figures."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(args: argparse.Namespace, device: str, packages: tuple[str, ...]) -> list[str]:
    """The command, host, CPU, library versions, `device` (a line), RAM and load average."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = [f"torch {torch.__version__}"] + [
        f"{name} {importlib.import_module(name).__version__}" for name in packages
    ]
    lines = [
        f"command: {shlex.join([sys.executable, sys.argv[0], *args.argv])}",
        f"host: {platform.node()} | {platform.platform()} | Python {platform.python_version()}",
        f"cpu: {cpu_name()} | os.cpu_count()={os.cpu_count()} usable={usable} "
        f"torch threads={torch.get_num_threads()}",
        " | ".join(versions),
        device,
    ]
    try:
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        lines.append(f"memory: {kib / 2**20:.1f} GiB RAM")
    except (OSError, IndexError, ValueError):
        pass
    lines.append(f"load average at start: {load_average()}")
    return lines


def gpu_line(device: str | torch.device = 0) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"


# -- memory ------------------------------------------------------------------------------------
def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Make `ru_maxrss` forget the loading peak (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
