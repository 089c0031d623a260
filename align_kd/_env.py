"""What produced a result: library versions, the machine and its CPU kernels, the source commit.

Every benchmark record, teacher card and benchmark JSON carries :func:`versions`, so that a number
that does not reproduce bitwise can be traced: the same seed on the same machine gives the same
student here, but oneDNN and ATen pick their CPU kernels by the CPU's capability (AVX2, AVX-512,
AMX), and a different kernel sums in a different order.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import warnings
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


def bf16_is_native(device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU with bf16, or a CPU whose oneDNN
    kernels have it (AVX512-BF16 or AMX). Elsewhere bf16 autocast is emulated and slow: on a 2-core
    AVX2 CPU (AMD EPYC, 2 threads) one training step of the study's student took 0.86 s in bf16
    against 0.10 s in float32, and the fast CNN teacher's 7.99 s against 0.56 s."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_bf16()
    return False


@functools.cache
def _cpu_bf16() -> bool:
    """oneDNN's answer for this CPU, asked once (the Distiller asks on every autocast)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def amp_in_effect(amp: bool, device) -> bool:
    """Whether ``amp=True`` autocasts to bfloat16 on ``device``: only where bf16 is native
    (:func:`bf16_is_native`). Where it is not, warns and returns False (the run is float32)."""
    if not amp:
        return False
    if bf16_is_native(device):
        return True
    warnings.warn(f"amp=True: this {torch.device(device).type} has no native bfloat16 (CPU kernels: "
                  f"{torch.backends.cpu.get_cpu_capability()}), so bf16 autocast would be emulated, 8-14x slower than "
                  "float32 on an AVX2 CPU; training in float32 instead (the record's versions()['cpu_bf16'] says which "
                  "ran). Pass amp=False to silence this.", RuntimeWarning, stacklevel=3)
    return False


def channels_last_hazards(*modules, cpu_capability: str | None = None) -> list[str]:
    """The convolutions of ``modules`` whose weight gradient oneDNN's AVX2 kernels get wrong in
    channels_last (uxlfoundation/oneDNN#6035, open: a 1x1 convolution with stride > 1 and fewer than 8
    input channels per group writes past its workspace, so backward corrupts the heap, hangs or returns
    wrong gradients; seen here as "free(): invalid next size" on a ResNet of width 4). Empty where the
    CPU kernels are AVX-512 or better (``cpu_capability``: default this CPU's)."""
    cap = torch.backends.cpu.get_cpu_capability() if cpu_capability is None else cpu_capability
    if cap.startswith("AVX512"):
        return []
    return [f"{type(module).__name__}.{name} ({m.in_channels} -> {m.out_channels}, stride {tuple(m.stride)})"
            for module in modules for name, m in module.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels // m.groups < 8]


def channels_last_in_effect(channels_last: bool, device, *modules) -> bool:
    """Whether ``channels_last=True`` converts ``modules`` on ``device``: not on a CPU where one of
    their convolutions hits oneDNN's channels_last bug (:func:`channels_last_hazards`); there it warns
    and returns False (the same maths in the default memory format)."""
    if not channels_last or torch.device(device).type != "cpu":
        return channels_last
    hazards = channels_last_hazards(*modules)
    if hazards:
        warnings.warn(f"channels_last=True: on this CPU ({torch.backends.cpu.get_cpu_capability()} kernels) oneDNN "
                      f"computes wrong weight gradients, or corrupts memory, for 1x1 strided convolutions with fewer than 8 "
                      f"input channels in channels_last (uxlfoundation/oneDNN#6035): {', '.join(hazards)}. Training in "
                      "the default memory format instead (same results up to round-off). Pass channels_last=False to "
                      "silence this.", RuntimeWarning, stacklevel=3)
        return False
    return True


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
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": bf16_is_native("cpu"),
            "cpu_count": os.cpu_count(),
            "git_commit": commit, "git_dirty": dirty}
