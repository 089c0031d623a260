"""Distil the shipped fast CNN teacher into a small CNN in your own data-parallel loop.

    torchrun --nproc_per_node=2 examples/torchrun_distill.py --limit 4096 --epochs 1   # 2 CPU processes (Gloo)
    torchrun --nproc_per_node=4 examples/torchrun_distill.py --device cuda             # one process per GPU (NCCL)

Each rank trains on its shard of CIFAR-10 (``cifar10_loaders(rank=, world_size=)``); the
``Distiller`` is wrapped in ``DistributedDataParallel``, which averages the gradients of the
student, the MI bank and the plan. Rank 0 prints and saves ``distiller.pt``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import align_kd
from align_kd.data import cifar10_loaders
from align_kd.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 archive or folder (default: $ALIGN_KD_DATA)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="training images (default: all 50,000)")
    ap.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    ap.add_argument("--batch-size", type=int, default=128, help="per process")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--strategy", default="sinkhorn", choices=list(align_kd.PLANS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/torchrun-example")
    args = ap.parse_args()

    if "RANK" not in os.environ:
        raise SystemExit("Start this script with torchrun, e.g. `torchrun --nproc_per_node=2 examples/torchrun_distill.py`.")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))

    train, test = cifar10_loaders(args.data, batch_size=args.batch_size, limit=args.limit,
                                  test_limit=args.test_limit, device=device,
                                  rank=rank, world_size=dist.get_world_size())
    teacher, card = align_kd.zoo.load_teacher("fastcnn")
    torch.manual_seed(0)  # the same student on every rank (DDP would broadcast rank 0's anyway)
    student = build_model("cnn", width=16)
    teacher.to(device), student.to(device)

    x0, _ = next(iter(train))
    distiller = align_kd.Distiller(teacher, student, x0.to(device), strategy=args.strategy, verbose=rank == 0)
    model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(distiller.param_groups(lr=args.lr, weight_decay=5e-4), lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(train))
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        distiller.train()
        for x, y in train:
            out = model(x, y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
        acc = align_kd.evaluate(student, test, device)  # every rank scores the whole test set here
        if rank == 0:
            terms = " ".join(f"{k} {v.item():.3f}" for k, v in out.terms.items())
            print(f"epoch {epoch + 1}/{args.epochs}: loss {out.loss.item():.3f} ({terms}) test acc {acc:.4f} "
                  f"(teacher {card['test_acc']:.4f})", flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(distiller.state_dict(), os.path.join(args.out, "distiller.pt"))
        print(f"plan (rows teacher layers {distiller.teacher_layers}, columns student layers {distiller.student_layers}):")
        print(out.plan)
    distiller.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
