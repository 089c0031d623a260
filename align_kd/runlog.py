"""Training logger: per-step and per-epoch scalars to CSV files, and to TensorBoard when installed.

Layout of a run directory ``log_dir``::

    steps.csv     step, <step scalar names...>                       one row per logged optimiser step
    epochs.csv    epoch, step, <epoch scalar names...>, plan_<stat>   one row per epoch
    plan.png      latest (T, S) plan heat-map (TensorBoard runs only; overwritten every epoch)
    events.out.tfevents.*   TensorBoard event files (when TensorBoard is used)

Units: ``step`` is the global optimiser step (an integer count, the x axis of every TensorBoard
curve), ``epoch`` an integer count, scalar values are whatever the caller logs (losses in nats,
accuracies as fractions, learning rates per step, ...); plan statistics are described in
:func:`plan_stats`. Plans are (T, S): rows teacher layers, columns student layers, every column
sums to 1.

Crash safety: epoch rows are flushed as soon as they are written, step rows at least every
:data:`STEP_FLUSH_EVERY` rows, on every epoch row and on :meth:`RunLogger.close`, so a crashed
run leaves parseable CSV files (at most a partial last line, which a resumed logger drops).
"""
from __future__ import annotations

import csv
import io
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_text

__all__ = ["RunLogger", "clear_logs", "plan_stats", "STEP_FLUSH_EVERY", "STEPS_CSV", "EPOCHS_CSV", "PLAN_PNG"]

STEP_FLUSH_EVERY = 50  # step rows buffered at most this many rows before a flush
STEPS_CSV = "steps.csv"
EPOCHS_CSV = "epochs.csv"
PLAN_PNG = "plan.png"
PLAN_PREFIX = "plan_"  # CSV column prefix of the plan statistics
COLUMN_SUM_ATOL = 1e-3  # tolerance on |column sum - 1| in plan_stats


def clear_logs(log_dir) -> list[str]:
    """Remove the CSV logs and plan image of an earlier run from ``log_dir`` (a new run's logs start
    empty); warns naming what it removed. TensorBoard hides the old events itself (purge_step)."""
    import warnings

    removed = []
    for name in (STEPS_CSV, EPOCHS_CSV, PLAN_PNG):
        path = Path(log_dir) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    if removed:
        warnings.warn(f"Starting new logs in {log_dir}: replaced {removed} of an earlier run there (resume=True "
                      "continues a run and keeps its logs).", RuntimeWarning, stacklevel=2)
    return removed


# --------------------------------------------------------------------------------------------
# Plan statistics
# --------------------------------------------------------------------------------------------


def _plan_array(plan: Any) -> np.ndarray:
    """A float64 numpy copy of a (T, S) tensor / array / nested list; ValueError on bad input."""
    if hasattr(plan, "detach") and callable(plan.detach):  # torch.Tensor (any device / dtype)
        plan = plan.detach().cpu().double().numpy()
    try:
        p = np.array(plan, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "Expected `plan` to be a (T, S) array of numbers (tensor, ndarray or nested list; rows teacher "
            f"layers, columns student layers) but could not convert a {type(plan).__name__}: {e}"
        ) from None
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(
            "Expected `plan` to be a non-empty 2-D (T, S) array (rows teacher layers, columns student layers) "
            f"but got shape {tuple(p.shape)}."
        )
    bad = ~np.isfinite(p)
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"Expected a finite `plan` but got {int(bad.sum())} NaN/inf entries "
            f"(first at (teacher, student) = {idx}); a diverged run? Check the loss before logging."
        )
    if (p < 0).any():
        idx = tuple(int(v) for v in np.unravel_index(np.argmin(p), p.shape))
        raise ValueError(
            f"Expected a non-negative `plan` but got minimum {p.min():.6g} at (teacher, student) = {idx}."
        )
    return p


def plan_stats(plan: Any, *, atol: float = COLUMN_SUM_ATOL) -> dict[str, float]:
    """Summary statistics of a (T, S) alignment plan (rows teacher layers, columns student layers).

    Every column is a distribution over the T teacher layers. Returned keys (Python floats):

    - ``entropy``: mean over the S columns of the column entropy ``-sum_i p_ij ln p_ij``, in nats
      (0 = every student layer follows one teacher layer, ``ln T`` = uniform).
    - ``max_weight``: mean over columns of the largest entry (dimensionless, in [1/T, 1]).
    - ``effective_teachers``: mean over columns of ``exp(column entropy)``, a count of teacher
      layers in [1, T].
    - ``row_mass_min`` / ``row_mass_max``: smallest / largest row sum, i.e. the total weight a
      teacher layer receives, in student-layer units (rows sum to S in total).
    - ``diagonal_share``: fraction in [0, 1] of the S units of mass on the depth-matched one-to-one
      pairing ``(round(j (T-1)/(S-1)), j)`` of :func:`align_kd.plans.pairwise_plan`.

    An all-zero plan (strategy ``"hinton"``, no feature term) has no statistics: returns ``{}``.
    Raises ValueError for input that is not 2-D, has negative or non-finite entries, or whose
    columns do not sum to 1 within ``atol``.
    """
    from .plans import pairwise_plan

    p = _plan_array(plan)  # (T, S)
    T, S = p.shape
    if not p.any():
        return {}
    col = p.sum(axis=0)  # (S,)
    off = np.abs(col - 1.0)
    if off.max() > atol:
        j = int(np.argmax(off))
        raise ValueError(
            f"Expected a (T, S) = ({T}, {S}) plan whose columns (student layers) each sum to 1 (within {atol:g}) "
            f"but column {j} sums to {col[j]:.6g}; pass the normalised plan (or an all-zero plan for no feature term)."
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # (T, S), 0 ln 0 = 0
    h = -plogp.sum(axis=0)  # (S,) column entropies, nats
    h = np.maximum(h, 0.0)  # rounding can give -1e-17 for one-hot columns
    rows = p.sum(axis=1)  # (T,) row masses
    mask = pairwise_plan(T, S).double().numpy()  # (T, S) one-hot columns
    return {
        "entropy": float(h.mean()),
        "max_weight": float(p.max(axis=0).mean()),
        "effective_teachers": float(np.exp(h).mean()),
        "row_mass_min": float(rows.min()),
        "row_mass_max": float(rows.max()),
        "diagonal_share": float((p * mask).sum() / S),
    }


# --------------------------------------------------------------------------------------------
# CSV tables
# --------------------------------------------------------------------------------------------


def _cell(key: str, value: Any) -> Any:
    """A CSV cell: '' for None, int for integers, float otherwise (written with repr, so exact)."""
    if value is None:
        return ""
    if hasattr(value, "detach") and callable(value.detach):  # a torch scalar tensor
        if value.numel() != 1:
            raise TypeError(
                f"Expected scalar {key!r} to be a number or a one-element tensor but got a tensor of shape "
                f"{tuple(value.shape)}."
            )
        value = value.detach().cpu().item()
    elif isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.size == 1):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"Expected scalar {key!r} to be a number (int, float, scalar tensor) or None but got "
                    f"{type(value).__name__}: {value!r}.")


class _CsvTable:
    """One CSV file whose columns are fixed by its existing header or else by the first row."""

    def __init__(self, path: Path, index: tuple[str, ...], resume_step: int | None):
        self.path = path
        self.index = index  # leading integer columns, e.g. ("epoch", "step")
        self.header: list[str] | None = None
        self._check_resumed = False  # first row after resuming must match the existing header
        self._file = None
        self._writer = None
        self._unflushed = 0
        if path.exists() and path.stat().st_size > 0:
            self._load_existing(resume_step)

    def _load_existing(self, resume_step: int | None) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            text = f.read()
        records = list(csv.reader(io.StringIO(text)))
        changed = False
        if records and not text.endswith("\n"):  # crashed mid-row: drop the partial last record
            records.pop()
            changed = True
        if not records:  # nothing complete (not even the header): start the file afresh
            self.path.unlink()
            return
        header, body = records[0], records[1:]
        if tuple(header[: len(self.index)]) != self.index or len(set(header)) != len(header):
            raise ValueError(
                f"Expected {self.path} to be a RunLogger CSV whose header starts with {list(self.index)} "
                f"but its header is {header}. Use a fresh log_dir or remove the file."
            )
        if resume_step is not None:
            k = header.index("step")
            kept = []
            for n, row in enumerate(body, start=2):
                try:
                    s = int(row[k])
                except (IndexError, ValueError):
                    raise ValueError(
                        f"Expected an integer 'step' in every row of {self.path} to resume at step {resume_step} "
                        f"but line {n} is {row}. Repair or remove the file."
                    ) from None
                if s <= resume_step:
                    kept.append(row)
            changed = changed or len(kept) != len(body)
            body = kept
        if changed:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(header)
            w.writerows(body)
            atomic_write_text(self.path, buf.getvalue())
        self.header = header
        self._check_resumed = True

    def write(self, row: dict[str, Any]) -> None:
        cells = {k: _cell(k, v) for k, v in row.items()}  # TypeError before any state changes
        if self.header is None:
            self.header = list(row)
        else:
            unknown = [k for k in row if k not in self.header]
            if unknown:
                raise ValueError(
                    f"Expected the columns of {self.path.name} to stay those of its first row, {self.header}, "
                    f"but got unknown key(s) {unknown}. Log every scalar name from the first row on "
                    f"(pass None for a value not available yet) or use a new log_dir."
                )
            if self._check_resumed:
                missing = [k for k in self.header if k not in row]
                if missing:
                    raise ValueError(
                        f"Expected the resumed run to log the same columns as the existing {self.path} "
                        f"({self.header}) but its first row lacks {missing}. Resume with the same "
                        f"configuration or use a new log_dir."
                    )
        self._check_resumed = False
        if self._file is None:
            new = not (self.path.exists() and self.path.stat().st_size > 0)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._file, fieldnames=self.header, restval="")
            if new:
                self._writer.writeheader()
        self._writer.writerow(cells)
        self._unflushed += 1

    def flush(self) -> None:
        if self._file is not None and self._unflushed:
            self._file.flush()
            self._unflushed = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None
            self._writer = None


# --------------------------------------------------------------------------------------------
# The logger
# --------------------------------------------------------------------------------------------


def _summary_writer_cls(tensorboard: bool | None):
    """SummaryWriter class, or None for CSV only."""
    if tensorboard is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if tensorboard:
            raise ImportError(
                f"Expected the `tensorboard` package for RunLogger(tensorboard=True) but it is not importable "
                f"({e}). Install it with `pip install tensorboard`, or pass tensorboard=None/False for CSV only."
            ) from e
        return None
    return SummaryWriter


def _read_png_chw(path: Path):
    """(3, H, W) uint8 tensor of an image file (alpha dropped, grey expanded to RGB)."""
    import warnings

    try:
        from torchvision.io import ImageReadMode, read_image
    except ImportError:  # torchvision without image IO: Pillow (a dependency of matplotlib) reads it
        import torch
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its image IO in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        img = read_image(str(path), mode=ImageReadMode.UNCHANGED)  # (C, H, W) uint8
    if img.shape[0] in (2, 4):  # grey+alpha / RGBA
        img = img[:-1]
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.contiguous()


class RunLogger:
    """Per-step and per-epoch scalars to CSV in ``log_dir`` always, and to TensorBoard when installed.

    Args:
        log_dir: run directory (created). Holds ``steps.csv``, ``epochs.csv`` and, with TensorBoard,
            the event files and ``plan.png`` (the latest plan heat-map).
        tensorboard: ``None`` uses TensorBoard when importable, ``True`` requires it (ImportError
            otherwise), ``False`` writes CSV only.
        enabled: ``False`` (non-zero ranks of a distributed run) makes every method a no-op that
            creates no file and no directory.
        teacher_layers / student_layers: names of the T teacher / S student layers, used as the
            heat-map tick labels (default ``T0..``, ``S0..``).
        resume_step: when resuming, the global step of the checkpoint. Existing CSV rows with
            ``step > resume_step`` (written by the interrupted run after that checkpoint) are
            removed, and TensorBoard events after it are purged, so an exact resume leaves no
            duplicate or orphaned rows. ``None``: existing files are appended to as they are.

    Existing CSV files are always appended to (never truncated); the first row logged after
    resuming must have exactly the columns of the existing header. Columns of a new file are fixed
    by its first row: later rows may omit keys or pass None (empty cells) but not add keys.
    TensorBoard tags: ``train/<name>`` for step scalars, ``epoch/<name>`` for epoch scalars,
    ``plan/<stat>`` for :func:`plan_stats`, image ``plan/heatmap``; x axis the global step.
    """

    def __init__(self, log_dir: str | os.PathLike, *, tensorboard: bool | None = None, enabled: bool = True,
                 teacher_layers: list[str] | None = None, student_layers: list[str] | None = None,
                 resume_step: int | None = None):
        self.enabled = bool(enabled)
        self.log_dir = Path(log_dir)
        self.teacher_layers = list(teacher_layers) if teacher_layers is not None else None
        self.student_layers = list(student_layers) if student_layers is not None else None
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, numbers.Integral)
                                        or resume_step < 0):
            raise ValueError(f"Expected `resume_step` to be a non-negative int or None but got {resume_step!r}.")
        self.resume_step = None if resume_step is None else int(resume_step)
        self._closed = False
        self._writer = None
        self._steps = self._epochs = None
        if not self.enabled:
            return
        writer_cls = _summary_writer_cls(tensorboard)  # raises before touching the disk
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._steps = _CsvTable(self.log_dir / STEPS_CSV, ("step",), self.resume_step)
        self._epochs = _CsvTable(self.log_dir / EPOCHS_CSV, ("epoch", "step"), self.resume_step)
        if writer_cls is not None:
            purge = None if self.resume_step is None else self.resume_step + 1  # hide events with step > resume
            self._writer = writer_cls(log_dir=str(self.log_dir), purge_step=purge)

    @property
    def tensorboard(self) -> bool:
        """Whether scalars also go to TensorBoard."""
        return self._writer is not None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunLogger({str(self.log_dir)!r}) is closed; create a new one to log more.")

    @staticmethod
    def _check_names(scalars: dict[str, Any], reserved: tuple[str, ...]) -> None:
        for k in scalars:
            if not isinstance(k, str) or not k:
                raise ValueError(f"Expected scalar names to be non-empty strings but got {k!r}.")
            if k in reserved:
                raise ValueError(f"Expected scalar names other than the reserved columns {list(reserved)} but got {k!r}.")

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """One row of ``steps.csv`` (and ``train/<name>`` at x = ``step``): the global step's scalars."""
        if not self.enabled:
            return
        self._check_open()
        self._check_names(scalars, ("step",))
        row = {"step": int(step), **scalars}
        self._steps.write(row)
        if self._steps._unflushed >= STEP_FLUSH_EVERY:
            self._steps.flush()
        if self._writer is not None:
            for k, v in scalars.items():
                v = _cell(k, v)
                if v != "":
                    self._writer.add_scalar(f"train/{k}", v, global_step=int(step))

    def log_epoch(self, epoch: int, step: int, scalars: dict[str, float | None], plan=None) -> None:
        """One row of ``epochs.csv``: epoch, global step, scalars (None = empty cell), plan statistics.

        ``plan``: optional (T, S) plan; its :func:`plan_stats` become columns ``plan_<stat>`` (and
        ``plan/<stat>``), and with TensorBoard its heat-map is written to ``log_dir/plan.png`` and
        logged as image ``plan/heatmap`` (skipped for an all-zero plan). Flushes every file.
        """
        if not self.enabled:
            return
        self._check_open()
        self._check_names(scalars, ("epoch", "step"))
        stats = plan_stats(plan) if plan is not None else {}
        clash = [k for k in scalars if k.startswith(PLAN_PREFIX) and k[len(PLAN_PREFIX):] in stats]
        if clash:
            raise ValueError(f"Expected epoch scalar names not colliding with the plan statistics columns but got {clash}.")
        row = {"epoch": int(epoch), "step": int(step), **scalars, **{PLAN_PREFIX + k: v for k, v in stats.items()}}
        self._epochs.write(row)
        self._steps.flush()
        self._epochs.flush()
        if self._writer is not None:
            gs = int(step)
            for k, v in scalars.items():
                v = _cell(k, v)
                if v != "":
                    self._writer.add_scalar(f"epoch/{k}", v, global_step=gs)
            for k, v in stats.items():
                self._writer.add_scalar(f"plan/{k}", v, global_step=gs)
            if stats:  # non-zero plan: the heat-map, drawn by the library's own renderer
                from .graph import draw_plan_heatmap

                png = draw_plan_heatmap(plan, self.log_dir / PLAN_PNG, teacher_layers=self.teacher_layers,
                                        student_layers=self.student_layers)
                self._writer.add_image("plan/heatmap", _read_png_chw(Path(png)), global_step=gs, dataformats="CHW")
            self._writer.flush()

    def close(self) -> None:
        """Flush and close every file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        self._steps.close()
        self._epochs.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RunLogger({str(self.log_dir)!r}, enabled={self.enabled}, tensorboard={self.tensorboard}, "
                f"resume_step={self.resume_step})")
