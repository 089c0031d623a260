"""Atomic file writes: write a temporary file in the target folder, then rename over the target.

A crash mid-write leaves the previous file intact, never a half-written one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _atomic(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; caches may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj, path) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic(path, lambda f: f.write(text.encode()))
