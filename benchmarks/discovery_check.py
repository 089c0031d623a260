"""Issue 15 on real data: a ModuleList-style teacher and student (blocks run by a loop in forward).

Before the structural discovery fix such models got only their logits as a tap, so `pairwise` and
`sinkhorn` trained the same student to the last test image. This trains a ModuleList teacher on
CIFAR-10, distils the same student initialisation with `pairwise` and with `sinkhorn`, and reports
the taps, both accuracies, how many test predictions differ and the largest weight difference.
Output: benchmarks/results/discovery_check.json.

    python benchmarks/discovery_check.py [--train-limit 10000] [--epochs 2]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import default_root, write_json
from torch import nn

from align_kd import fit
from align_kd.data import cifar10_loaders
from align_kd.experiment import versions
from align_kd.models import train_supervised


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class LoopNet(nn.Module):
    """Research-repository style: blocks in an nn.ModuleList, run by a loop; functional head."""

    def __init__(self, widths):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c_in, c_out, 1 if i == 0 else 2)
                                    for i, (c_in, c_out) in enumerate(zip((3, *widths[:-1]), widths)))
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = cifar10_loaders(default_root(), batch_size=128, limit=args.train_limit)
    torch.manual_seed(0)
    teacher = LoopNet((32, 64, 128, 128))
    train_supervised(teacher, train, epochs=args.teacher_epochs, lr=0.1, progress=False)
    runs = {}
    for strategy in ("pairwise", "sinkhorn"):
        torch.manual_seed(1)
        student = LoopNet((16, 32, 32))
        res = fit(teacher, student, (train, test), strategy=strategy, epochs=args.epochs, seed=0, progress=False)
        with torch.no_grad():
            preds = torch.cat([student.eval()(x).argmax(1) for x, _ in test])
        runs[strategy] = {"result": res, "preds": preds, "weights": [p.detach().clone() for p in student.parameters()]}
    a, b = runs["pairwise"], runs["sinkhorn"]
    differ = int((a["preds"] != b["preds"]).sum())
    max_dw = max(float((x - y).abs().max()) for x, y in zip(a["weights"], b["weights"]))
    ra, rb = a["result"], b["result"]
    print(f"teacher taps: {ra.teacher_layers}\nstudent taps: {ra.student_layers}\nplan {tuple(ra.plan.shape)}")
    print(f"pairwise test acc {ra.test_acc:.4f}, sinkhorn test acc {rb.test_acc:.4f}; "
          f"{differ} of {len(a['preds'])} test predictions differ; max |weight difference| {max_dw:.3g}")
    write_json({"teacher_layers": ra.teacher_layers, "student_layers": ra.student_layers,
                "pairwise_acc": ra.test_acc, "sinkhorn_acc": rb.test_acc, "predictions_differ": differ,
                "test_images": len(a["preds"]), "max_weight_difference": max_dw,
                "pairwise_plan": ra.plan.tolist(), "sinkhorn_plan": rb.plan.tolist(), "args": vars(args),
                "versions": versions()}, Path(__file__).resolve().parent / "results" / "discovery_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
