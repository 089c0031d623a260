"""What produced a result: library versions, the machine and its CPU kernels, the source commit.

Every benchmark record, teacher card and benchmark JSON carries :func:`versions`, so that a number
that does not reproduce bitwise can be traced: the same seed on the same machine gives the same
student here, but oneDNN and ATen pick their CPU kernels by the CPU's capability (AVX2, AVX-512,
AMX), and a different kernel sums in a different order.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, whether the tree has uncommitted changes) of the checkout the package lives in;
    (None, None) for an installed copy or where git is missing."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=_PACKAGE, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        return head.stdout.strip(), bool(run("status", "--porcelain").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions() -> dict:
    """Versions of the stack, the thread count, the machine (CPU model and the kernel set torch
    dispatches to) and the git commit, as one JSON-ready dict."""
    import numpy
    import torchvision

    import align_kd

    commit, dirty = _git_state()
    return {"align_kd": align_kd.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "git_commit": commit, "git_dirty": dirty}
