"""Data-parallel training for :func:`align_kd.fit` (``torchrun --nproc_per_node=N``).

``fit()`` needs no change to run under ``torchrun``: it reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
initialises the default process group when nobody has (NCCL on CUDA with the device taken from
``LOCAL_RANK``, Gloo on CPU), and then:

* shards the training data: a :class:`~align_kd.data.TensorLoader` is rebuilt with ``rank`` and
  ``world_size``; a ``DataLoader`` over a map-style dataset is rebuilt with a
  ``DistributedSampler`` (shuffled when the original was, seed ``FitConfig.seed``, ``set_epoch``
  every epoch); anything else is refused unless wrapped with :func:`presharded`;
* trains the :class:`~align_kd.Distiller` wrapped in torch's ``DistributedDataParallel`` (the
  frozen teacher is not a submodule, so it is not wrapped; it is broadcast from rank 0 once), which
  averages the gradients of the student, the MI bank and the plan logits in backward. A skipped
  step (non-finite input or loss) on any rank is skipped on every rank (:meth:`DistContext.agree_on_skip`,
  one collective before the backward);
* averages floating-point buffers (BatchNorm running statistics, the MI standardisers) and
  broadcasts the others from rank 0 at the end of every epoch, so every rank ends with the same
  state (the plan, including the Sinkhorn warm-start potential, follows from identical gradients);
* evaluates on a disjoint shard of the test set per rank and all-reduces the correct/total counts,
  so the accuracy equals that of one process evaluating the whole set;
* lets only rank 0 print, show progress bars and write checkpoints.

Use :func:`is_main` to guard your own file writes (``result.save(...)``) in a ``torchrun`` script.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistContext", "data_parallel", "env_world_size", "is_main", "mean_over_ranks", "presharded", "setup"]


def env_world_size() -> int:
    """World size from the process group when initialised, else from ``$WORLD_SIZE`` (1 if unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def data_parallel() -> bool:
    """Whether a torch.distributed process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of ``t`` over the ranks of the running process group (``t`` itself in one process)."""
    if not data_parallel():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in a plain single process): the one process that should write files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


class presharded:
    """Mark a training loader as already sharded by the caller, so ``fit()`` uses it as it is.

    Every rank must yield the same number of batches per epoch (checked); ``set_epoch`` is
    forwarded to the loader (or its sampler) when it has one.
    """

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        _set_epoch(self.loader, epoch)

    def __getattr__(self, name):  # batch_size, dataset, sampler, ... of the wrapped loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


@torch.no_grad()
def _unflatten_into(flat: Tensor, tensors: list[Tensor]) -> None:
    """Copy consecutive slices of the 1-D ``flat`` back into ``tensors`` (in place, own dtype/device)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.device, t.dtype))
        offset += n


def _set_epoch(loader, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _dataloader_kwargs(loader) -> dict:
    """The options of a torch DataLoader that a rebuilt loader must keep (not the sampler)."""
    kw = dict(
        batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kw["prefetch_factor"] = loader.prefetch_factor
        kw["multiprocessing_context"] = loader.multiprocessing_context
    if getattr(loader, "pin_memory_device", ""):
        kw["pin_memory_device"] = loader.pin_memory_device
    return kw


_CANNOT_SHARD = (
    "Cannot shard the training data across {ws} processes: {why}. Pass an align_kd.data.TensorLoader, "
    "or a torch DataLoader over a map-style dataset with shuffle=True/False and no custom sampler "
    "(it is rebuilt with a DistributedSampler), or shard it yourself (e.g. a DataLoader with a "
    "DistributedSampler) and wrap it as align_kd.distributed.presharded(loader)."
)


@dataclass
class DistContext:
    """Where this process sits in a data-parallel run (world_size 1: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    _eval_cache: dict = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------
    # collectives (all no-ops in a single process)

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.backend == "nccl" and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Run the body on rank 0 first, then on the other ranks (e.g. download, decode, train a teacher once)."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks (a new tensor on ``t``'s device)."""
        if not self.enabled:
            return t
        buf = t.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device() if self.backend == "nccl" else None)
        return box[0]

    def broadcast_tensors(self, tensors: list[Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (bucketed per dtype and device)."""
        if not self.enabled:
            return
        groups: dict[tuple, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for (dtype, _), ts in groups.items():
            flat = torch.cat([t.detach().reshape(-1).to(self._comm_device(), torch.float64 if dtype == torch.bool else dtype)
                              for t in ts])
            dist.broadcast(flat, src=0)
            _unflatten_into(flat, ts)

    def broadcast_modules(self, modules) -> None:
        """Every parameter and buffer of ``modules`` (None entries skipped) set to rank 0's values."""
        tensors = [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]
        self.broadcast_tensors(tensors)

    def sync_buffers(self, average=(), broadcast=()) -> None:
        """Average the floating-point buffers of ``average`` modules over ranks (their other buffers,
        e.g. BatchNorm's ``num_batches_tracked``, come from rank 0); broadcast every buffer of the
        ``broadcast`` modules from rank 0."""
        if not self.enabled:
            return
        floats, others = [], []
        for m in average:
            if m is None:
                continue
            for b in m.buffers():
                (floats if b.is_floating_point() else others).append(b)
        for m in broadcast:
            if m is not None:
                others.extend(m.buffers())
        if floats:
            dtype = torch.float64 if any(b.dtype == torch.float64 for b in floats) else torch.float32
            flat = torch.cat([b.detach().reshape(-1).to(self._comm_device(), dtype) for b in floats])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            _unflatten_into(flat, floats)
        self.broadcast_tensors(others)

    def agree_on_skip(self, bad: str | None) -> str | None:
        """Whether to skip this step on every rank: ``bad`` is this rank's reason (None: fine). One
        all-reduce of a single number; returns None when every rank is fine, else this rank's
        reason or a note that another rank skipped."""
        if not self.enabled:
            return bad
        flag = torch.tensor([0.0 if bad is None else 1.0], device=self._comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        n_bad = round(float(flag))
        if n_bad == 0:
            return None
        return bad or f"{n_bad} of {self.world_size} ranks had a non-finite input or loss"

    def wrap(self, module: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` in :class:`torch.nn.parallel.DistributedDataParallel` (rank 0's parameters and
        buffers on every rank; gradients averaged in backward), or ``module`` itself in one process.

        Buffers are not broadcast at every forward: :meth:`sync_buffers` averages them at epoch
        ends. ``find_unused_parameters``: some parameters may get no gradient in a step (the MI
        pairs that ``skip_pairs_below`` leaves out; the same on every rank, since plans agree).
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        import inspect

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers synced at construction, not at every forward (torch >= 2.14 names it forward_sync_buffers)
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters, **no_forward_sync)

    # ------------------------------------------------------------------------------------------
    # data

    def shard_train(self, loader, *, seed: int = 0):
        """This rank's share of the training data (the loader itself in a single process)."""
        if not self.enabled:
            return loader
        from torch.utils.data import (
            DataLoader,
            DistributedSampler,
            IterableDataset,
            RandomSampler,
            SequentialSampler,
        )
        from torch.utils.data.sampler import BatchSampler

        from .data import TensorLoader

        ws = self.world_size
        if isinstance(loader, presharded):
            out = loader
        elif isinstance(loader, TensorLoader):
            if loader.world_size == ws and loader.rank == self.rank:
                out = loader
            elif loader.world_size != 1:
                raise ValueError(_CANNOT_SHARD.format(ws=ws, why=(
                    f"the TensorLoader is already sharded as rank {loader.rank} of {loader.world_size}, "
                    f"but this process is rank {self.rank} of {ws}")))
            else:
                out = TensorLoader(
                    loader.images, loader.labels, batch_size=loader.batch_size, shuffle=loader.shuffle,
                    augment=loader.augment, seed=loader.seed, drop_last=loader.drop_last, device=loader.device,
                    rank=self.rank, world_size=ws, padding=loader.padding,
                )
                out.data_tag = loader.data_tag
        elif isinstance(loader, DataLoader):
            if isinstance(loader.dataset, IterableDataset):
                raise ValueError(_CANNOT_SHARD.format(ws=ws, why="its dataset is an IterableDataset, which has no indices to split"))
            sampler = loader.sampler
            if isinstance(sampler, DistributedSampler):
                if sampler.num_replicas != ws or sampler.rank != self.rank:
                    raise ValueError(_CANNOT_SHARD.format(ws=ws, why=(
                        f"its DistributedSampler is set up for rank {sampler.rank} of {sampler.num_replicas}")))
                out = presharded(loader)
            else:
                if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
                    raise ValueError(_CANNOT_SHARD.format(ws=ws, why=f"it uses a custom batch_sampler ({type(loader.batch_sampler).__name__})"))
                if type(sampler) not in (RandomSampler, SequentialSampler):
                    raise ValueError(_CANNOT_SHARD.format(ws=ws, why=f"it uses a custom sampler ({type(sampler).__name__})"))
                if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
                    raise ValueError(_CANNOT_SHARD.format(ws=ws, why="its RandomSampler draws with replacement or a num_samples"))
                if loader.batch_size is None:
                    raise ValueError(_CANNOT_SHARD.format(ws=ws, why="it has batch_size=None (no automatic batching)"))
                dsampler = DistributedSampler(loader.dataset, num_replicas=ws, rank=self.rank,
                                              shuffle=isinstance(sampler, RandomSampler), seed=seed,
                                              drop_last=loader.drop_last)
                kw = _dataloader_kwargs(loader)
                out = presharded(DataLoader(loader.dataset, sampler=dsampler, **kw))
        else:
            raise TypeError(_CANNOT_SHARD.format(ws=ws, why=f"a {type(loader).__name__} cannot be split by rank"))
        n = torch.tensor([len(out), -len(out)], dtype=torch.float64)
        lo_neg_hi = self._all_reduce_min(n)
        if lo_neg_hi[0] != len(out) or -lo_neg_hi[1] != len(out):
            raise ValueError(
                f"Every rank must run the same number of training steps per epoch but they range from "
                f"{int(lo_neg_hi[0])} to {int(-lo_neg_hi[1])} batches; shard to equal sizes "
                "(DistributedSampler or TensorLoader pad the last shard)."
            )
        return out

    def _all_reduce_min(self, t: Tensor) -> Tensor:
        buf = t.to(self._comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MIN)
        return buf.cpu()

    def eval_shard(self, loader):
        """(loader over this rank's disjoint share of the test set, True) or (loader, False) when it cannot be split."""
        key = id(loader)
        if key in self._eval_cache and self._eval_cache[key][0] is loader:
            return self._eval_cache[key][1:]
        from torch.utils.data import (
            DataLoader,
            DistributedSampler,
            IterableDataset,
            SequentialSampler,
            Subset,
        )
        from torch.utils.data.sampler import BatchSampler

        from .data import TensorLoader

        shard, split = loader, False
        if isinstance(loader, TensorLoader) and loader.world_size == 1 and loader.dataset_size >= self.world_size:
            idx = torch.arange(self.rank, loader.dataset_size, self.world_size, device=loader.images.device)
            shard = TensorLoader(loader.images[idx], loader.labels[idx], batch_size=loader.batch_size, shuffle=False,
                                 augment=loader.augment, seed=loader.seed, device=loader.device)
            split = True
        elif (isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)
              and type(loader.sampler) is SequentialSampler and type(loader.batch_sampler) is BatchSampler
              and len(loader.dataset) >= self.world_size):
            sub = Subset(loader.dataset, range(self.rank, len(loader.dataset), self.world_size))
            kw = _dataloader_kwargs(loader)
            kw["drop_last"] = False
            shard, split = DataLoader(sub, shuffle=False, **kw), True
        elif isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
            split = True  # already sharded by the caller (padding may count a few samples twice)
        self._eval_cache[key] = (loader, shard, split)
        return shard, split

    def reduce_epoch_stats(self, sums: dict, n: int, mi_sum: Tensor | None, mi_n: int):
        """Add up an epoch's running sums over ranks (so every rank records the same history)."""
        if not self.enabled:
            return sums, n, mi_sum, mi_n
        keys = list(sums)
        head = torch.tensor([float(n), float(mi_n)] + [float(sums[k]) for k in keys], dtype=torch.float64)
        parts = [head] if mi_sum is None else [head, mi_sum.detach().double().reshape(-1).cpu()]
        # every rank skips the same steps, so mi_sum is None on all ranks or on none
        total = self.all_reduce_sum(torch.cat(parts))
        n, mi_n = int(total[0]), int(total[1])
        sums = {k: float(total[2 + i]) for i, k in enumerate(keys)}
        if mi_sum is not None:
            mi_sum = total[2 + len(keys):].view(mi_sum.shape).to(mi_sum.dtype)
        return sums, n, mi_sum, mi_n


_created_group = False


def _other_threads_runnable() -> bool | None:
    """Whether a thread of this process other than the caller is runnable (Linux ``/proc``; None
    where that cannot be read)."""
    me = str(threading.get_native_id())
    try:
        tasks = [t for t in os.listdir("/proc/self/task") if t != me]
        states = []
        for t in tasks:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                with open(f"/proc/self/task/{t}/stat") as f:
                    states.append(f.read().rpartition(")")[2].split()[0])
    except OSError:
        return None
    return "R" in states


def _let_threads_settle(timeout: float = 2.0, quiet_polls: int = 3, poll: float = 0.002) -> None:
    """Sleep (the GIL released) until no other thread has been runnable for ``quiet_polls``
    consecutive polls, or ``timeout`` seconds; a fixed 0.1 s where ``/proc`` is unavailable.

    Why: torch's DistributedDataParallel keeps the Gloo process group alive after it is destroyed
    (its worker threads are never joined), and a worker drops its last reference to a finished
    collective's tensors slightly after the caller's ``wait()`` returns. If that happens after the
    interpreter started finalising, taking the GIL ends the thread inside a C++ destructor and the
    process aborts ("terminate called without an active exception", SIGABRT at exit; 4 of 40
    two-process runs on a loaded 2-core machine, 0 of 80 with this wait). Letting those threads finish their
    last release while the interpreter is still whole closes that window.
    """
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < quiet_polls and time.monotonic() < deadline:
        busy = _other_threads_runnable()
        if busy is None:
            time.sleep(0.1)
            return
        quiet = 0 if busy else quiet + 1
        time.sleep(poll)


def _destroy() -> None:
    """At exit, for a group :func:`setup` created: let the collectives' worker threads finish
    releasing their tensors, then destroy the group (see :func:`_let_threads_settle`)."""
    global _created_group
    if _created_group and dist.is_initialized():
        _let_threads_settle()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _created_group = False


def _resolve_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(device: str | torch.device | None = None) -> DistContext:
    """This process's :class:`DistContext`; initialises the default process group under ``torchrun``.

    Single process (no ``WORLD_SIZE`` > 1 and no initialised group): world_size 1, ``device`` as
    given (None: CUDA when available, else CPU). Under ``torchrun``: a CUDA device without an index
    becomes ``cuda:$LOCAL_RANK`` (made current); the group is created with NCCL on CUDA and Gloo
    on CPU unless the caller already created one.
    """
    global _created_group
    initialised = dist.is_available() and dist.is_initialized()
    ws = env_world_size()
    dev = _resolve_device(device)
    if not initialised and ws <= 1:
        return DistContext(device=dev)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={ws} asks for {ws} processes but this torch build has no torch.distributed.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; start at most "
                    "that many processes per node (torchrun --nproc_per_node) or pass device='cpu' for Gloo on CPU."
                )
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not initialised:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={ws} is set but {missing} are not; start the script with "
                f"`torchrun --nproc_per_node={ws} script.py` (which sets them), or unset WORLD_SIZE for one process."
            )
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
        if not _created_group:
            atexit.register(_destroy)
        _created_group = True
    backend = dist.get_backend()
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(
            f"The process group uses NCCL, which only moves CUDA tensors, but fit() runs on {dev}; pass a CUDA "
            "device, or initialise the group with backend='gloo' for CPU training."
        )
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=dev, backend=backend)
