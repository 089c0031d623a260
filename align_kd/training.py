"""``fit()``: distil a teacher into a student with a learned layer-alignment plan.

``fit()`` is a short loop on :class:`align_kd.Distiller`, which holds the objective (see its
module for the maths). One step:

    out = model(x, y, kd_scale=ramp)          model: the Distiller, or DistributedDataParallel(Distiller)
    skip the step on every rank if any rank's input or loss is not finite
    out.loss.backward(); clip; optimizer.step(); scheduler.step()
    plans with data of their own ("exact") are updated when they ask to be

After every epoch: statistics summed over ranks, running buffers averaged, the test set scored
(each sample once), a checkpoint of the state dicts written, and a row appended to the logs.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .checkpoint import Checkpointer
from .config import DISTILLER_OPTIONS, FitConfig
from .data import split_heldout
from .distiller import Distiller, DistillerOutput, _first_line
from .distributed import DistContext
from .distributed import setup as _setup_distributed
from .evaluation import evaluate, preserve_mode
from .result import FitResult

__all__ = ["FitConfig", "FitResult", "TrainingDiverged", "evaluate", "fit"]


# ----------------------------------------------------------------------------------------------
# input checks


def _oom_message(cfg: FitConfig, loader, err: BaseException) -> str:
    batch = getattr(loader, "batch_size", None)
    first = _first_line(err)
    hints = [f"the batch size{f' (now {batch})' if batch else ''}",
             f"the MI bank's pooling resolution `pool` (now {cfg.pool})", f"the regressor `width` (now {cfg.width})"]
    extra = " bank_layout='full' needs far more memory than 'shared'." if cfg.bank_layout == "full" else ""
    extra += "" if cfg.amp else " amp=True (bfloat16 autocast) also saves memory."
    return f"CUDA out of memory in fit() ({first}). Lower {', '.join(hints[:-1])} or {hints[-1]}.{extra}"


# ----------------------------------------------------------------------------------------------
# input checks


def _looks_like_batch(item) -> bool:
    return isinstance(item, dict) or (isinstance(item, (tuple, list)) and len(item) > 0 and isinstance(item[0], Tensor))


def _split_data(data):
    if isinstance(data, (tuple, list)):
        if len(data) > 0 and _looks_like_batch(data[0]):
            first = data[0]
            what = (f"dicts with keys {sorted(first)}" if isinstance(first, dict)
                    else f"{type(first).__name__}s of {[type(b).__name__ for b in first]}")
            raise TypeError(
                f"Expected `data` to be a loader (an iterable of (inputs, labels) batches, e.g. a DataLoader) or a "
                f"(train_loader, test_loader) pair, but got a {type(data).__name__} of {len(data)} batches ({what}). "
                "Pass the batches as the training loader with no test loader: fit(teacher, student, (batches, None))"
                + (", after converting each dict to a tuple, e.g. batches = [(b['image'], b['label']) for b in batches]."
                   if isinstance(first, dict) else ".")
            )
        if len(data) != 2:
            raise ValueError(f"Expected `data` to be a DataLoader or a (train_loader, test_loader) pair but got a sequence of length {len(data)}.")
        return data[0], data[1]
    return data, None


def _first_batch(loader, role: str):
    try:
        batch = next(iter(loader))
    except TypeError:
        raise TypeError(f"Expected the {role} data to be an iterable of (inputs, labels) batches (e.g. a DataLoader) but got {type(loader).__name__}.") from None
    except StopIteration:
        raise ValueError(f"The {role} loader yielded no batch; is the dataset empty?") from None
    if isinstance(batch, dict):
        keys = sorted(map(str, batch))
        raise TypeError(
            f"Expected the {role} loader to yield (inputs tensor, labels tensor) pairs but it yielded dicts with keys "
            f"{keys}. Wrap it so that it yields tuples, e.g. a generator class whose __iter__ yields "
            "(b['image'], b['label']) for each batch b and whose __len__ is len(loader), or return tuples from the "
            "dataset's __getitem__."
        )
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor) and isinstance(batch[1], Tensor)):
        got = type(batch).__name__ if not isinstance(batch, (tuple, list)) else f"a {type(batch).__name__} of {[type(b).__name__ for b in batch]}"
        raise TypeError(f"Expected the {role} loader to yield (inputs tensor, labels tensor) pairs but it yielded {got}.")
    x, y = batch[0], batch[1]
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.dim() != 1 or len(y) != len(x):
        raise TypeError(
            f"Expected {role} labels as an integer tensor of shape (B,) = ({len(x)},) but got dtype {y.dtype} and shape {tuple(y.shape)}."
        )
    return x, y


def _check_labels(loader, role: str, num_classes: int, first_labels: Tensor) -> None:
    """Labels in 0..num_classes-1: every label of a TensorLoader, else those of its first batch."""
    labels = getattr(loader, "labels", None)
    if not isinstance(labels, Tensor):
        labels = first_labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"The {role} loader has labels outside the teacher's class range 0..{num_classes - 1}: found "
            f"{sorted(set(bad.tolist()))[:10]} ({len(bad)} of {len(labels)} checked). Expected class indices the teacher "
            f"predicts; remap the labels or use a teacher with {int(labels.max()) + 1} outputs."
        )


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class LoopState:
    """What fit()'s loop carries besides the state dicts: counters, the record so far, and the
    batches a data-needing plan ("exact") keeps aside. Saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # training steps taken (skipped ones included)
    bad_in_a_row: int = 0
    history: list[dict] = field(default_factory=list)
    solves: list[dict] = field(default_factory=list)
    held: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    mi_last: Tensor | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "bad_in_a_row": self.bad_in_a_row, "history": self.history,
                "solves": self.solves, "held": [(x.detach().cpu(), y.detach().cpu()) for x, y in self.held],
                "mi_last": None if self.mi_last is None else self.mi_last.detach().cpu()}

    def load_state_dict(self, d: dict, device) -> None:
        self.epoch, self.step, self.bad_in_a_row = d["epoch"], d["step"], d["bad_in_a_row"]
        self.history, self.solves = list(d["history"]), list(d["solves"])
        self.held = [(x.to(device), y.to(device)) for x, y in d["held"]]
        self.mi_last = d["mi_last"]


def make_optimizer(distiller: Distiller, cfg: FitConfig) -> torch.optim.Optimizer:
    groups = distiller.param_groups(lr=cfg.lr, weight_decay=cfg.weight_decay, plan_lr=cfg.plan_lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer, cfg: FitConfig, steps_per_epoch: int):
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the last step; the plan's
    group with ``plan_schedule="constant"`` stays at its rate after the warm-up."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def cosine(k):
        return (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm)))

    def constant(k):
        return (k + 1) / warm if k < warm else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        constant if g.get("name") == "plan" and cfg.plan_schedule == "constant" else cosine for g in optimizer.param_groups])


def train_step(model, distiller: Distiller, optimizer, scheduler, x: Tensor, y: Tensor, *, kd_scale: float,
               grad_clip: float | None, dist: DistContext) -> DistillerOutput | str:
    """One optimiser step on (x, y); returns the Distiller's output, or why the step was skipped.

    A non-finite input or loss on any rank skips the step on every rank (a one-number collective
    before and one after the forward); the running statistics the forward updated (BatchNorm, the
    bank's standardisers) are put back.
    """
    saved = [b.detach().clone() for b in distiller.running_buffers()]
    # agreed before the forward too: a data-parallel forward has collectives of its own (the bank's
    # standardisers), which a rank that skipped would leave waiting
    bad = dist.agree_on_skip(None if torch.isfinite(x).all() else "the input batch contains NaN or inf")
    if bad is None:
        out = model(x, y, kd_scale=kd_scale)
        bad = dist.agree_on_skip(None if torch.isfinite(out.loss) else f"the loss is {out.loss.item()}")
    if bad is not None:
        with torch.no_grad():
            for b, v in zip(distiller.running_buffers(), saved):
                b.copy_(v)
        return bad
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    scheduler.step()
    return out


def _rows_of_plan(distiller: Distiller, mi: Tensor) -> Tensor:
    """``mi`` (T, S) with the plan's rows: a zero row for the dustbin (no teacher, no information)."""
    return torch.cat([mi, mi.new_zeros(1, mi.shape[1])]) if distiller.plan.dustbin else mi


def _kd_ramp(cfg: FitConfig, step: int, steps_per_epoch: int) -> float:
    """The logit term's warm-up factor: linear from 0 to 1 over the first kd_warmup of training."""
    warm = cfg.kd_warmup * cfg.epochs * steps_per_epoch
    return 1.0 if warm <= 0 else min(1.0, (step + 1) / warm)


class TrainingDiverged(RuntimeError):
    """fit() gave up: ``max_bad_steps`` training steps in a row were skipped (a non-finite loss or
    gradient). ``first_step`` and ``step`` are the first and last of them (0-based), ``reason`` the last one's."""

    def __init__(self, message: str, *, first_step: int, step: int, reason: str):
        super().__init__(message)
        self.first_step, self.step, self.reason = first_step, step, reason


def _too_many_bad_steps(cfg: FitConfig, n: int, what: str, step: int, last: dict | None = None) -> TrainingDiverged:
    """The error fit() stops with; ``last`` is the last finite step's logged row (its loss terms), if any."""
    first = step - n + 1
    terms = ""
    if last is not None:
        terms = (f" The last finite step, {first - 1}, had ce {last['ce']:.4g}, kd {last['kd']:.4g} and feature "
                 f"(sum(lam * mi), nats) {last['feature']:.4g}.")
        if cfg.mi_estimator == "vid" and last["feature"] < -max(1.0, last["ce"]):
            # a VID bound far below 0: a residual large against a variance learned near its floor (1 / var up to 1 / eps)
            terms += (f" A feature bound that far below 0 is a VID variance near its floor (vid_eps={cfg.vid_eps}) "
                      "meeting a large residual: raise `vid_eps` (e.g. 1e-2) or set `grad_clip`.")
    return TrainingDiverged(
        f"{n} training steps in a row were skipped ({what}; steps {first}-{step}).{terms} Likely causes: a learning rate "
        f"too high (lr={cfg.lr}), a plan temperature too low (tau={cfg.tau}), or NaN/inf in the "
        "input data. Lower `lr`, raise `tau` or check the data.", first_step=first, step=step, reason=what)


def _run(distiller: Distiller, model, optimizer, scheduler, state: LoopState, train_loader, test_loader, cfg: FitConfig,
         dist: DistContext, checkpointer: Checkpointer | None, logger, heldout: list | None) -> None:
    from tqdm.auto import tqdm

    steps_per_epoch = len(train_loader)
    last_epoch = cfg.stop_after_epochs or cfg.epochs  # a truncated run stops early on the full schedule
    show = cfg.progress and dist.is_main  # data parallel: only rank 0 prints
    bar = tqdm(total=last_epoch * steps_per_epoch, initial=state.epoch * steps_per_epoch, disable=not show,
               desc=f"fit[{cfg.strategy}]", unit="step", leave=False)
    keys = ("loss", "ce", "kd", "acc", "feature", "pairs_evaluated")
    last_row = None  # the last finite step's logged row: what a TrainingDiverged reports
    for epoch in range(state.epoch, last_epoch):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        sums, n, mi_sum, mi_n, skipped = dict.fromkeys(keys, 0.0), 0, None, 0, 0
        start = time.perf_counter()
        distiller.train()
        for x, y, *_ in train_loader:
            if distiller.plan.data == "held" and len(state.held) < cfg.held_batches:
                state.held.append((x.to(distiller.device), y.to(distiller.device)))
            if distiller.plan.data == "heldout" and distiller.plan_update_due(state.step + 1, steps_per_epoch):
                distiller.capture_step_start()  # heldout_grad_point="before_step": the MI gradients' point
            out = train_step(model, distiller, optimizer, scheduler, x, y, kd_scale=_kd_ramp(cfg, state.step, steps_per_epoch),
                             grad_clip=cfg.grad_clip, dist=dist)
            state.step += 1
            bar.update(1)
            if isinstance(out, str):
                state.bad_in_a_row += 1
                skipped += 1
                warnings.warn(f"Skipped training step {state.step - 1}: {out}.", RuntimeWarning, stacklevel=2)
                if state.bad_in_a_row >= cfg.max_bad_steps:
                    raise _too_many_bad_steps(cfg, state.bad_in_a_row, out, state.step - 1, last_row)
                continue
            state.bad_in_a_row = 0
            row = {"loss": out.loss.item(), **{k: v.item() for k, v in out.terms.items()},
                   "acc": (out.logits.argmax(1) == y.to(out.logits.device)).float().mean().item(),
                   "pairs_evaluated": out.pairs_evaluated}
            last_row = row
            n += 1
            for k in keys:
                sums[k] += row[k]
            if out.mi is not None:
                mi = out.mi.float().cpu()
                mi_sum, mi_n = (mi if mi_sum is None else mi_sum + mi), mi_n + 1
            if logger is not None:
                logger.log_step(state.step, {**row, "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.3f}")
            if distiller.plan_update_due(state.step, steps_per_epoch):
                if distiller.plan.data == "heldout":  # the k-th update reads held-out batch k (cycling): stateless on resume
                    record = distiller.update_plan(train=(x, y), heldout=heldout[distiller.plan.updates % len(heldout)])
                else:
                    record = distiller.update_plan(state.held)
                state.solves.append({"step": state.step, **record})
        # data parallel: statistics over every rank's steps; BatchNorm and standardiser statistics
        # averaged, the plan's buffers (Sinkhorn potential) from rank 0
        sums, n, mi_sum, mi_n = dist.reduce_epoch_stats(sums, n, mi_sum, mi_n)
        dist.sync_buffers(average=[distiller.student, distiller.bank], broadcast=[distiller.plan])
        record = {"epoch": epoch + 1, "step": state.step, **{k: v / max(n, 1) for k, v in sums.items()}}
        record["train_acc"] = record.pop("acc")
        record["skipped_steps"] = skipped
        record["lr"] = scheduler.get_last_lr()[0]
        record["wall_s"] = time.perf_counter() - start
        record["test_acc"] = evaluate(distiller.eval_model, test_loader, distiller.device, dist=dist) if test_loader is not None else None
        with torch.no_grad():
            plan = distiller.plan().detach().float().cpu()
        record["plan"] = plan.tolist()
        if distiller.bank is not None:  # diagnostics: how spread the plan is, how hard the held-out rule pushed
            record["plan_entropy"] = float(-(plan.double().clamp_min(1e-300).log() * plan.double()).sum(0).mean())
        if distiller.plan.data == "heldout":  # mean over this epoch's held-out updates (None: none this epoch)
            pushes = [r["hypergrad_norm"] for r in state.solves if r.get("kind") == "heldout" and r["step"] > state.step - steps_per_epoch]
            record["hypergrad_norm"] = sum(pushes) / len(pushes) if pushes else None
        state.mi_last = None if mi_sum is None else mi_sum / mi_n
        record["mi"] = None if state.mi_last is None else _rows_of_plan(distiller, state.mi_last).tolist()
        if distiller.plan.dustbin:  # share of the student layers' attention that goes to no teacher
            record["dustbin_mass"] = float(plan[-1].sum()) / plan.shape[1]
        state.history.append(record)
        state.epoch = epoch + 1
        if checkpointer is not None:
            checkpointer.save(distiller, optimizer, scheduler, state, train_loader)
        if logger is not None:
            # the plan and its statistics (plan_entropy, ...) are the logger's own columns
            logger.log_epoch(epoch + 1, state.step, {k: v for k, v in record.items()
                                                     if k not in ("epoch", "step", "mi") and not k.startswith("plan")},
                             plan=plan if distiller.bank is not None else None)
        if show:
            acc = "" if record["test_acc"] is None else f" test_acc {record['test_acc']:.4f}"
            bar.write(f"[{cfg.strategy}] epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} "
                      f"train_acc {record['train_acc']:.4f}{acc} ({record['wall_s']:.1f} s)")
    bar.close()


def fit(
    teacher: nn.Module,
    student: nn.Module,
    data,
    *,
    strategy="sinkhorn",
    teacher_layers: list[str] | None = None,
    student_layers: list[str] | None = None,
    **options,
) -> FitResult:
    """Distil ``teacher`` into ``student`` with a learned (or fixed) layer-alignment plan.

    Args:
        teacher: trained ``nn.Module`` returning logits (B, K); frozen, run in eval mode.
        student: ``nn.Module`` returning logits (B, K); trained in place.
        data: a DataLoader of ``(x, y)`` or a ``(train_loader, test_loader)`` pair.
        strategy: a name from :data:`align_kd.PLAN_STRATEGIES`: "hinton" (logit KD only), "pairwise"
            (one-to-one by relative depth), "uniform" (1/T everywhere), "softmax" (learned, column
            softmax), "sinkhorn" (learned transport plan, default), "exact" (solved from the MI
            estimates); or a fixed (T, S) tensor.
        teacher_layers / student_layers: tap names; default :func:`align_kd.discover_layers`.
        **options: any field of :class:`FitConfig` (epochs, beta, tau, lr, seed, device,
            checkpoint_dir, resume, log_dir, ...).

    Returns:
        :class:`FitResult` with the student, final plan (T, S), MI (T, S), names and history.

    The loop runs on :class:`align_kd.Distiller` (use that directly for a loop of your own). Under
    ``torchrun`` the run is data parallel with ``DistributedDataParallel`` (see
    :mod:`align_kd.distributed`); every rank returns the same result. With ``checkpoint_dir`` a
    checkpoint is written after every epoch and ``resume=True`` continues from the last one (see
    :mod:`align_kd.checkpoint`). ``log_dir`` (default: ``checkpoint_dir``) gets ``steps.csv`` and
    ``epochs.csv`` (and TensorBoard events when ``tensorboard`` is installed). On Ctrl-C the last
    completed epoch is on disk, a message says how to resume, and KeyboardInterrupt is re-raised.
    CUDA out-of-memory is re-raised with what to lower (batch size, ``pool``, ``width``).

    GPU path: ``amp=True`` (bfloat16 autocast), ``channels_last=True`` (teacher and student are
    converted in place and stay in that memory format; so are 4-D batches) and ``compile=True``
    (``torch.compile`` of the teacher and student forwards with their taps and of the MI bank; the
    modules themselves, their state_dicts and the returned student are not wrapped; evaluation
    stays eager).
    """
    fixed_plan = None
    if isinstance(strategy, Tensor):
        fixed_plan, strategy = strategy, "fixed"
    unknown = sorted(set(options) - set(FitConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"fit() got unknown option(s) {unknown}; valid options: {sorted(FitConfig.__dataclass_fields__)}.")
    cfg = FitConfig(strategy=strategy, **options)
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected the {role} to be a torch.nn.Module but got {type(model).__name__}.")
    train_loader, test_loader = _split_data(data)
    heldout = None
    if cfg.plan_objective == "heldout":  # the plan learns from a split of the training set (by default never trained on)
        split_train, heldout = split_heldout(train_loader, cfg.heldout_fraction, seed=cfg.seed)
        train_loader = train_loader if cfg.heldout_train_on_split else split_train
    # under torchrun: join (or create) the process group and take this rank's share of the data
    dist = _setup_distributed(cfg.device)
    train_loader = dist.shard_train(train_loader, seed=cfg.seed)
    config = asdict(cfg)
    if fixed_plan is not None:
        config["fixed_plan"] = fixed_plan.tolist()

    torch.manual_seed(cfg.seed)
    requires = [(p, p.requires_grad) for p in teacher.parameters()]  # the Distiller freezes the teacher
    distiller = checkpointer = logger = None
    state = LoopState()
    with preserve_mode(teacher, student):  # every submodule's training flag comes back as it was
        try:
            x, first_labels = _first_batch(train_loader, "training")
            test_labels = _first_batch(test_loader, "test")[1] if test_loader is not None else None
            teacher.to(dist.device)
            student.to(dist.device)
            distiller = Distiller(teacher, student, x[:2].to(dist.device), strategy=fixed_plan if fixed_plan is not None else cfg.strategy,
                                  teacher_layers=teacher_layers, student_layers=student_layers,
                                  verbose=cfg.progress and dist.is_main, **{k: getattr(cfg, k) for k in DISTILLER_OPTIONS})
            _check_labels(train_loader, "training", distiller.num_classes, first_labels)
            if test_loader is not None:
                _check_labels(test_loader, "test", distiller.num_classes, test_labels)
            dist.broadcast_modules([teacher])  # data parallel: every rank distils rank 0's teacher
            optimizer = make_optimizer(distiller, cfg)
            scheduler = make_scheduler(optimizer, cfg, len(train_loader))
            # data parallel: DistributedDataParallel (rank 0's student, bank and plan on every rank);
            # a single process trains the Distiller itself
            model = dist.wrap(distiller, find_unused_parameters=cfg.skip_pairs_below is not None)
            if cfg.checkpoint_dir is not None:
                checkpointer = Checkpointer(cfg.checkpoint_dir, keep=cfg.keep_checkpoints, dist=dist, config=config, teacher=teacher)
                checkpointer.prepare(distiller, optimizer, scheduler, state, train_loader, resume=cfg.resume)
            log_dir = cfg.log_dir or cfg.checkpoint_dir
            if log_dir is not None:
                from .runlog import RunLogger, clear_logs

                if state.step == 0 and dist.is_main:  # a fresh run starts fresh logs (a resumed one cuts them back)
                    clear_logs(log_dir)
                logger = RunLogger(log_dir, enabled=dist.is_main, teacher_layers=distiller.plan_rows,
                                   student_layers=distiller.student_layers, resume_step=state.step)
            _run(distiller, model, optimizer, scheduler, state, train_loader, test_loader, cfg, dist, checkpointer, logger, heldout)
        except KeyboardInterrupt:
            # Ctrl-C: the last completed epoch is on disk (saved now if it was not yet); then re-raise
            if checkpointer is not None and distiller is not None:
                checkpointer.on_interrupt(distiller, optimizer, scheduler, state, train_loader)
            elif dist.is_main:
                print(f"fit() interrupted (KeyboardInterrupt) after {len(state.history)}/{cfg.epochs} completed epochs; nothing "
                      "was saved. Pass checkpoint_dir=... to make a run resumable.", file=sys.stderr, flush=True)
            raise
        except torch.cuda.OutOfMemoryError as err:
            raise torch.cuda.OutOfMemoryError(_oom_message(cfg, train_loader, err)) from err
        finally:
            if logger is not None:
                logger.close()
            if distiller is not None:
                distiller.close()  # the taps' hooks come off the user's models
            for p, r in requires:
                p.requires_grad_(r)

    with torch.no_grad():
        plan = distiller.plan().detach().float().cpu()
    dustbin = distiller.plan.dustbin  # the plan's extra row is a node of its own in graphs and reports
    return FitResult(
        student=student,
        plan=plan,
        mi=None if state.mi_last is None else _rows_of_plan(distiller, state.mi_last),
        teacher_layers=distiller.plan_rows,
        student_layers=list(distiller.student_layers),
        teacher_shapes=distiller.teacher_shapes + ([[]] if dustbin else []),
        student_shapes=distiller.student_shapes,
        history=state.history,
        solves=state.solves,
        config=config,
        eval_model=distiller.eval_model,
    )
