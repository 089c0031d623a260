"""The one record of a distillation run: :class:`FitResult` (what ``fit()`` returns, what
``FitResult.save`` writes as ``result.json`` and what the graph tools and reports read)."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._io import atomic_save, atomic_write_text

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FitResult"]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    student: the distilled student (trained in place).
    plan: (T, S) final plan, columns sum to 1 (all zeros for "hinton": no feature term).
    mi: (T, S) MI estimates at the end, nats per element (VID) or per sample (InfoNCE); None for "hinton".
    teacher_layers / student_layers: tap names (rows / columns of plan and mi).
    teacher_shapes / student_shapes: per-sample feature shapes of the taps.
    history: one dict per epoch: losses, accuracies, plan, mi, wall time, skipped steps, share of pairs evaluated.
    solves: for "exact", one record per solve (step, method, solver, status, seconds).
    config: the options used (JSON-able).
    eval_model: the student as fit() evaluated it (its batches converted to channels_last where fit()
        trained that way; the student itself otherwise); None for a run read from disk. Not saved, not compared.
    path / display_name: where a run read from disk lives and its folder name (set by
    :func:`align_kd.graph.load_run`; display only: not in :meth:`to_dict`, not compared).
    """

    student: nn.Module | None
    plan: Tensor
    mi: Tensor | None
    teacher_layers: list[str]
    student_layers: list[str]
    teacher_shapes: list[list[int]]
    student_shapes: list[list[int]]
    history: list[dict] = field(default_factory=list)
    solves: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)
    display_name: str = field(default="", compare=False)
    eval_model: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def T(self) -> int:
        """Number of teacher layers (rows of the plan)."""
        return int(self.plan.shape[0])

    @property
    def S(self) -> int:
        """Number of student layers (columns of the plan)."""
        return int(self.plan.shape[1])

    @property
    def name(self) -> str:
        """A short display name: ``display_name``, else ``config["name"]`` or the strategy; may be ""."""
        if self.display_name:
            return self.display_name
        c = self.config if isinstance(self.config, Mapping) else {}
        return str(c.get("name") or c.get("strategy") or "")

    @property
    def strategy(self) -> str:
        """``config["strategy"]`` as a string ("" if unset)."""
        s = self.config.get("strategy") if isinstance(self.config, Mapping) else None
        return "" if s is None else str(s)

    @property
    def final_test_acc(self) -> float | None:
        """``test_acc`` of the last history entry that has a finite one (None if none does; unlike
        :attr:`test_acc`, which reads the last entry only)."""
        for h in reversed(self.history):
            acc = h.get("test_acc") if isinstance(h, Mapping) else None
            if acc is not None and isinstance(acc, (int, float)) and math.isfinite(float(acc)):
                return float(acc)
        return None

    def history_plans(self) -> list[tuple[int, np.ndarray, float | None]]:
        """``(epoch, plan, test_acc)`` for every history entry that stores a plan of shape (T, S).

        Each plan is a float64 numpy array; raises ValueError for a stored plan of another shape.
        """
        from .graph.analysis import _to_array

        shape = tuple(self.plan.shape)
        out = []
        for k, h in enumerate(self.history):
            if not isinstance(h, Mapping) or h.get("plan") is None:
                continue
            p = _to_array(h["plan"], f"history[{k}]['plan']")
            if p.shape != shape:
                raise ValueError(
                    f"Expected history[{k}]['plan'] to have the run's plan shape (T, S) = {shape} "
                    f"but got shape {p.shape}."
                )
            acc = h.get("test_acc")
            acc = float(acc) if isinstance(acc, (int, float)) else None
            out.append((int(h.get("epoch", k)), p, acc))
        return out

    @property
    def test_acc(self) -> float | None:
        """Last epoch's test accuracy (None without a test loader)."""
        return self.history[-1].get("test_acc") if self.history else None

    @property
    def best_acc(self) -> float | None:
        accs = [h["test_acc"] for h in self.history if h.get("test_acc") is not None]
        return max(accs) if accs else None

    def graph(self, threshold: float = 1e-3):
        """The networkx alignment graph of the final plan (see :func:`align_kd.alignment_graph`)."""
        from .graph.analysis import alignment_graph

        return alignment_graph(self, threshold=threshold)

    def to_dict(self) -> dict:
        """Everything but the student weights, JSON-able."""
        return {
            "plan": self.plan.tolist(),
            "mi": None if self.mi is None else self.mi.tolist(),
            "teacher_layers": self.teacher_layers,
            "student_layers": self.student_layers,
            "teacher_shapes": self.teacher_shapes,
            "student_shapes": self.student_shapes,
            "history": self.history,
            "solves": self.solves,
            "config": self.config,
            "test_acc": self.test_acc,
            "best_acc": self.best_acc,
        }

    def save(self, path) -> Path:
        """Write ``result.json`` (plan, MI, names, history, config) and ``student.pt`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "result.json", json.dumps(self.to_dict(), indent=1))
        if self.student is not None:
            atomic_save(self.student.state_dict(), path / "student.pt")
        return path

    @classmethod
    def load(cls, path, student: nn.Module | None = None) -> "FitResult":
        """Read a directory written by :meth:`save`; weights go into ``student`` when given."""
        path = Path(path)
        file = path / "result.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"No result.json at {file}; expected a directory written by FitResult.save().")
        d = json.loads(file.read_text())
        if student is not None:
            student.load_state_dict(torch.load(file.parent / "student.pt", map_location="cpu", weights_only=True))
        return cls(
            student=student,
            plan=torch.tensor(d["plan"]),
            mi=None if d["mi"] is None else torch.tensor(d["mi"]),
            teacher_layers=d["teacher_layers"],
            student_layers=d["student_layers"],
            teacher_shapes=d["teacher_shapes"],
            student_shapes=d["student_shapes"],
            history=d["history"],
            solves=d.get("solves", []),
            config=d["config"],
        )
