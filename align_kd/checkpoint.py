"""Checkpoints of a :func:`align_kd.fit` run: saved after every epoch, resumed exactly.

``fit(..., checkpoint_dir=d)`` writes ``d/checkpoint-epoch0003.pt`` after epoch 3 (rank 0 only) and
keeps the newest ``keep_checkpoints`` (default 2). A checkpoint holds everything the next epoch
depends on: the student, the MI bank and the plan module (logits and the Sinkhorn warm-start
potential), the optimiser and LR schedule, the RNG states of every rank (torch CPU and CUDA,
python ``random``, numpy, and the training loader's own generator), the history, the "exact"
solves and held-out batches, the step and epoch counters, and the :class:`~align_kd.FitConfig`.
Data order is a function of seed and epoch (``set_epoch``), so ``fit(..., checkpoint_dir=d,
resume=True)`` after a crash or Ctrl-C continues from the last completed epoch and ends with the
same student, plan and history (wall times aside) as a run that was never interrupted.

File format: the line ``ALIGN_KD_CHECKPOINT v1``, the sha256 (hex) of the rest, a newline, then a
``torch.save`` payload (read back with ``weights_only=True``). Files are written to a temporary
file in the same directory, fsynced and renamed over the target, so a crash leaves either the old
or the new file; a truncated or corrupted file fails the hash check and the next older checkpoint
is used instead, with a warning. :func:`read_checkpoint` reads one for inspection.

:func:`align_kd.models.train_supervised` (and so teacher training, ``zoo train NAME
--checkpoint-dir d``) writes the same files with the model, optimiser, Lookahead copy, history and
RNG states, and resumes the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ._io import _atomic

__all__ = [
    "RUNTIME_FIELDS",
    "CheckpointError",
    "Checkpointer",
    "checkpoint_path",
    "config_diff",
    "find_resume_point",
    "list_checkpoints",
    "newest_checkpoint",
    "prune_checkpoints",
    "read_checkpoint",
    "write_checkpoint",
]

FORMAT = "align_kd.checkpoint/1"
MAGIC = b"ALIGN_KD_CHECKPOINT v1\n"
_NAME = re.compile(r"^checkpoint-epoch(\d+)\.pt$")
#: FitConfig fields that may change between a run and its resumption (they do not change results
#: beyond float round-off)
RUNTIME_FIELDS = ("checkpoint_dir", "resume", "keep_checkpoints", "progress", "device", "channels_last", "compile", "log_dir",
                  "stop_after_epochs")  # where a run stops is not part of the run: a truncated run can be resumed to the end


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, corrupted, or not an align_kd checkpoint)."""


def checkpoint_path(directory, epoch: int) -> Path:
    """``directory/checkpoint-epoch{epoch:04d}.pt``: the checkpoint written after ``epoch`` epochs."""
    return Path(directory) / f"checkpoint-epoch{epoch:04d}.pt"


def list_checkpoints(directory) -> list[tuple[int, Path]]:
    """``[(epoch, path), ...]`` of the checkpoint files in ``directory``, oldest first (unverified)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _serialise(payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    return MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data


def _write_bytes(blob: bytes, path: Path) -> Path:
    _atomic(path, lambda f: f.write(blob))  # temp file in the same folder, fsync, os.replace
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def write_checkpoint(payload: dict, path) -> Path:
    """Write ``payload`` atomically (temp file in the same directory, fsync, rename) with its sha256."""
    return _write_bytes(_serialise(payload), Path(path))


def read_checkpoint(path, map_location="cpu") -> dict:
    """Read and verify a checkpoint file; raises :class:`CheckpointError` when it is unusable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"Cannot read checkpoint {path}: {err}.") from err
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an align_kd checkpoint (no '{MAGIC.decode().strip()}' header).")
    head_end = raw.find(b"\n", len(MAGIC))
    if head_end < 0:
        raise CheckpointError(f"{path} is truncated ({len(raw)} bytes: the header is incomplete).")
    digest, data = raw[len(MAGIC):head_end].decode(errors="replace"), raw[head_end + 1:]
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupted or truncated ({len(raw)} bytes; its sha256 does not match the one stored).")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # a file written by an incompatible version
        raise CheckpointError(f"{path} passed its hash check but torch.load failed: {err!r}.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {payload.get('format') if isinstance(payload, dict) else '?'}, expected {FORMAT}.")
    return payload


def prune_checkpoints(directory, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoint files in ``directory``."""
    for _, old in list_checkpoints(directory)[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()


def newest_checkpoint(directory) -> tuple[dict | None, list[str]]:
    """``(payload or None, problems)``: the newest checkpoint in ``directory`` that reads back
    intact, trying older ones when the newest is damaged; ``problems`` says what was skipped."""
    problems = []
    for epoch, path in reversed(list_checkpoints(directory)):
        try:
            payload = read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if payload.get("epoch") != epoch:
            problems.append(f"{path} holds epoch {payload.get('epoch')}, not {epoch} (renamed file?).")
            continue
        return payload, problems
    return None, problems


def find_resume_point(directory, resume: bool) -> tuple[tuple[str, str] | None, dict | None]:
    """``(message, payload)`` for a run about to start with ``checkpoint_dir=directory``.

    Without ``resume`` the directory must hold no checkpoint (message ``("error", ...)`` otherwise,
    so that a new run never overwrites an old one); with it, ``payload`` is the newest usable
    checkpoint (None: start from scratch) and ``message`` a warning about damaged files skipped, or
    an error when none is usable. Shared by :func:`align_kd.fit` and :func:`align_kd.models.train_supervised`.
    """
    directory = Path(directory)
    existing = list_checkpoints(directory)
    if not resume:
        if existing:
            return ("error", (
                f"checkpoint_dir {str(directory)!r} already holds {len(existing)} checkpoint(s) "
                f"(newest: {existing[-1][1].name}). Pass resume=True to continue that run, or choose an empty "
                "directory (or delete those files) to start a new one.")), None
        return None, None
    payload, problems = newest_checkpoint(directory)
    if payload is None and existing:
        return ("error", (f"No usable checkpoint in {directory}: " + " ".join(problems)
                          + " Delete the damaged files to start over, or pass resume=False with an empty directory.")), None
    if problems:
        return ("warn", (f"Skipped unusable checkpoint(s): {' '.join(problems)} Resuming from epoch "
                         f"{payload['epoch']} instead.")), payload
    return None, payload


# ----------------------------------------------------------------------------------------------
# RNG states


def _loader_generators(loader) -> list[torch.Generator]:
    gens = []
    for owner in (loader, getattr(loader, "sampler", None)):
        g = getattr(owner, "generator", None) if owner is not None else None
        if isinstance(g, torch.Generator):
            gens.append(g)
    return gens


def capture_rng(loader=None) -> dict:
    """This process's RNG states: torch CPU and CUDA, python ``random``, numpy, the loader's generators."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "generators": [g.get_state() for g in _loader_generators(loader)] if loader is not None else [],
    }


def restore_rng(state: dict, loader=None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    gens = _loader_generators(loader) if loader is not None else []
    if len(gens) == len(state["generators"]):
        for g, s in zip(gens, state["generators"]):
            g.set_state(s)


# ----------------------------------------------------------------------------------------------
# configuration checks


def config_diff(stored: dict, current: dict, ignore=RUNTIME_FIELDS, defaults: dict | None = None) -> list[str]:
    """Names of the fields whose values differ between two config dicts (``ignore`` left out). A field
    ``stored`` lacks counts as ``defaults[field]`` (a checkpoint written before the option existed ran
    as its default does), else as None."""
    defaults = defaults or {}
    keys = sorted((set(stored) | set(current)) - set(ignore))
    return [k for k in keys if stored.get(k, defaults.get(k)) != current.get(k)]


def tensor_digest(named_tensors) -> str:
    """sha256 of (name, tensor) pairs, names and raw bytes: the same values give the same string."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _teacher_digest(teacher) -> str:
    return tensor_digest(teacher.state_dict().items())


# ----------------------------------------------------------------------------------------------
# fit()'s side


class Checkpointer:
    """Saves a fit() run after every epoch (rank 0) and restores it on resume (every rank): the
    state dicts of the Distiller, optimiser and scheduler, fit()'s loop state and every rank's RNGs.

    Args:
        directory: where ``checkpoint-epochNNNN.pt`` files go.
        keep: how many of the newest checkpoints to keep (>= 1; 2 allows a fallback).
        dist: the :class:`~align_kd.distributed.DistContext`.
        config: the run's options (``asdict(FitConfig)`` plus ``fixed_plan``), compared on resume.
        teacher: the teacher (its weights are fingerprinted; a different teacher on resume warns).
    """

    def __init__(self, directory, *, keep: int, dist, config: dict, teacher):
        self.directory = Path(directory)
        self.keep = keep
        self.dist = dist
        self.config = config
        self.teacher = teacher
        self.saved_epoch = 0
        self.last_path: Path | None = None
        self._teacher_sha: str | None = None

    def teacher_sha(self) -> str:
        if self._teacher_sha is None:
            self._teacher_sha = _teacher_digest(self.teacher)
        return self._teacher_sha

    # -- saving ---------------------------------------------------------------------------------

    def _payload(self, distiller, optimizer, scheduler, state, rng: list[dict]) -> dict:
        return {
            "format": FORMAT,
            "epoch": state.epoch,
            "step": state.step,
            "distiller": distiller.state_dict(),  # student, MI bank, plan (and its warm start)
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loop": state.state_dict(),  # counters, history, solves, held batches, last MI
            "rng": rng,
            "config": self.config,
            "teacher_layers": list(distiller.teacher_layers),
            "student_layers": list(distiller.student_layers),
            "teacher_shapes": distiller.teacher_shapes,
            "student_shapes": distiller.student_shapes,
            "teacher_sha256": self.teacher_sha(),
            "world_size": self.dist.world_size,
            "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]},
        }

    def _write(self, payload: dict) -> Path:
        path = checkpoint_path(self.directory, payload["epoch"])
        write_checkpoint(payload, path)
        self.saved_epoch, self.last_path = payload["epoch"], path
        prune_checkpoints(self.directory, self.keep)
        return path

    def save(self, distiller, optimizer, scheduler, state, loader) -> Path | None:
        """Collective: gather every rank's RNG state, then rank 0 writes the checkpoint."""
        rng = self.dist.all_gather_object(capture_rng(loader))
        if not self.dist.is_main:
            self.saved_epoch = state.epoch
            return None
        return self._write(self._payload(distiller, optimizer, scheduler, state, rng))

    def on_interrupt(self, distiller, optimizer, scheduler, state, loader) -> None:
        """After Ctrl-C: make sure the last completed epoch is on disk (rank 0), say how to resume."""
        if not self.dist.is_main:
            return
        if self.saved_epoch < state.epoch:
            # interrupted at an epoch boundary, before or while saving: the state is still that epoch's
            # end; no collectives here (other ranks may be gone), so every rank gets rank 0's RNG state
            self._write(self._payload(distiller, optimizer, scheduler, state, [capture_rng(loader)] * self.dist.world_size))
        if self.saved_epoch == 0:
            msg = (f"fit() interrupted before the first epoch finished; no checkpoint was written to {self.directory}. "
                   "Nothing to resume from.")
        else:
            total = self.config.get("epochs")
            msg = (f"fit() interrupted (KeyboardInterrupt) after {self.saved_epoch}/{total} completed epochs. The last "
                   f"completed epoch is saved in {self.last_path or checkpoint_path(self.directory, self.saved_epoch)}. "
                   f"Resume with fit(..., checkpoint_dir={str(self.directory)!r}, resume=True) and the same teacher, "
                   "student architecture, data and options.")
        print(msg, file=sys.stderr, flush=True)

    # -- resuming -------------------------------------------------------------------------------

    def prepare(self, distiller, optimizer, scheduler, state, loader, resume: bool) -> None:
        """Collective: on ``resume`` load the newest good checkpoint into the distiller, optimiser,
        scheduler, loop state and RNGs; else insist on a clean directory."""
        out = find_resume_point(self.directory, resume) if self.dist.is_main else None
        message, payload = self.dist.broadcast_object(out)
        if message is not None and message[0] == "error":
            raise (ValueError if not resume else CheckpointError)(message[1])
        if message is not None and self.dist.is_main:
            warnings.warn(message[1], RuntimeWarning, stacklevel=3)
        if not resume or payload is None:
            return
        self._load(distiller, optimizer, scheduler, state, loader, payload)

    def _load(self, distiller, optimizer, scheduler, state, loader, p: dict) -> None:
        from .config import FitConfig

        defaults = {name: f.default for name, f in FitConfig.__dataclass_fields__.items()}
        diff = config_diff(p["config"], self.config, defaults=defaults)
        for key in ("teacher_layers", "student_layers", "teacher_shapes", "student_shapes"):
            if p[key] != getattr(distiller, key):
                diff.append(key)
        if diff:
            details = "; ".join(f"{k}: checkpoint {p['config'].get(k, defaults.get(k, p.get(k)))!r}, now "
                                f"{self.config.get(k, getattr(distiller, k, None))!r}" for k in diff)
            raise ValueError(
                f"Cannot resume from {self.directory}: the checkpoint was written with different options: {details}. "
                "Resume with the same options (only " + ", ".join(RUNTIME_FIELDS) + " may change), or start a new "
                "run in an empty checkpoint_dir."
            )
        if self.dist.is_main and p.get("teacher_sha256") != self.teacher_sha():
            warnings.warn("The teacher's weights differ from those of the checkpointed run; the resumed run will not "
                          "match an uninterrupted one.", RuntimeWarning, stacklevel=4)
        try:
            distiller.load_state_dict(p["distiller"])
        except RuntimeError as err:
            raise ValueError(f"Cannot resume from {self.directory}: the student (or MI bank) does not match the "
                             f"checkpoint's weights: {err}") from err
        optimizer.load_state_dict(p["optimizer"])
        scheduler.load_state_dict(p["scheduler"])
        state.load_state_dict(p["loop"], distiller.device)
        rng = p["rng"]
        if len(rng) != self.dist.world_size:
            if self.dist.is_main:
                warnings.warn(f"The checkpoint was written by {len(rng)} process(es), this run has {self.dist.world_size}; "
                              "data shards and RNG streams differ, so results will not match an uninterrupted run.",
                              RuntimeWarning, stacklevel=4)
            rng = [rng[0]] * self.dist.world_size
        restore_rng(rng[self.dist.rank], loader)
        self.saved_epoch, self.last_path = p["epoch"], checkpoint_path(self.directory, p["epoch"])
