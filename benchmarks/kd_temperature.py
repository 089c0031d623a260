"""Is the shipped teacher's soft target informative at the KD temperature? (issue 12, item 3)

Hinton's term matches the student's softmax(z / T) to the teacher's. A teacher whose logits span
a small range (label smoothing in its recipe, a 1/9 output scale) gives at T = 4 a target close to
uniform: the term then pulls the student towards uniform predictions, like strong label smoothing,
whatever the teacher knows. For each temperature T this script prints the teacher's softened
distribution on the test images (mean entropy against log 10 for uniform, mean largest
probability) and trains the `hinton` row of a `real` setting at that T, every other option as the
protocol's, beside `alone` (paired by seed); ``--teachers`` repeats it for other shipped teachers
(`fastcnn-ce`: the same recipe without label smoothing). The setting's own teacher at its own
temperature, and `alone` (which has no teacher), are the setting's runs in results/<setting>/
(found finished when they are); the others go to results/kd_temperature/. Resumable.
Output: benchmarks/results/kd_temperature.json.

    python benchmarks/kd_temperature.py [--setting real-cnn] [--temperatures 1 2 4] [--seeds 1]
                                        [--teachers fastcnn fastcnn-ce] [--out FILE]
"""
import argparse
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from _common import default_root, write_json

from align_kd import FitConfig, zoo
from align_kd.data import TensorLoader, load_cifar10
from align_kd.experiment import REAL_SETTINGS, run_setting, versions

ROOT = Path(__file__).resolve().parent


@torch.no_grad()
def softened_targets(teacher, images, labels, temperatures) -> dict:
    """Per T: the teacher's mean entropy (nats) and mean largest probability of softmax(z / T) on
    ``images``; also its accuracy and mean logit range (max - min per image)."""
    logits = torch.cat([teacher(x) for x, _ in TensorLoader(images, labels, batch_size=500)])  # (N, classes)
    out = {"test_acc": float((logits.argmax(1) == labels).float().mean()),
           "logit_range": float((logits.max(1).values - logits.min(1).values).mean()),
           "uniform_entropy": math.log(logits.shape[1])}
    for t in temperatures:
        p = torch.softmax(logits / t, dim=1)
        out[f"T={t:g}"] = {"entropy": float(-(p * p.clamp_min(1e-12).log()).sum(1).mean()),
                           "max_prob": float(p.max(1).values.mean())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="real-cnn", choices=sorted(REAL_SETTINGS))
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--teachers", nargs="+", default=None, choices=sorted(zoo.RECIPES),
                    help="shipped teachers to distil from (default: the setting's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "kd_temperature.json"))
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = REAL_SETTINGS[args.setting]
    if base.teacher_zoo is None:
        raise SystemExit(f"Setting {base.name!r} has no shipped teacher; choose one of the zoo settings.")
    root = args.data or default_root()
    own_t = base.fit_options.get("kd_temperature", FitConfig().kd_temperature)
    seeds = list(range(args.seeds))
    test_x, test_y = load_cifar10(root, split="test")
    alone, _ = run_setting(base, ["alone"], seeds, ROOT / "results", data_root=root, progress=False)
    teachers, rows = {}, []
    for name in args.teachers or [base.teacher_zoo]:
        teacher, _ = zoo.load_teacher(name)
        teachers[name] = stats = softened_targets(teacher, test_x, test_y, args.temperatures)
        for t in args.temperatures:
            setting, out = base, ROOT / "results"
            if t != own_t or name != base.teacher_zoo:
                setting = replace(base, teacher_zoo=name, name=f"{base.name}{'' if name == base.teacher_zoo else '-' + name}"
                                  f"{'' if t == own_t else f'-kdT{t:g}'}",
                                  fit_options={**base.fit_options, "kd_temperature": t})
                out = ROOT / "results" / "kd_temperature"
            records, _ = run_setting(setting, ["hinton"], seeds, out, data_root=root, progress=False)
            diffs = [h["test_acc"] - a["test_acc"] for h, a in zip(records, alone)]
            rows.append({"teacher": name, "temperature": t, "setting": setting.name, "accs": [r["test_acc"] for r in records],
                         "train_accs": [r.get("train_acc") for r in records], "vs_alone": diffs,
                         "wall_s": [r["wall_s"] for r in records], **stats[f"T={t:g}"]})
    alone_acc = sum(r["test_acc"] for r in alone) / len(alone)
    print(f"\n{base.name}: `alone` {alone_acc:.4f} ({len(alone)} seed(s)); uniform entropy "
          f"{next(iter(teachers.values()))['uniform_entropy']:.3f} nats; teachers: " + ", ".join(
              f"{n} (test acc {s['test_acc']:.4f}, mean logit range {s['logit_range']:.2f})" for n, s in teachers.items()) + "\n")
    print("| teacher | KD temperature | teacher entropy (nats) | teacher max prob | hinton test acc | vs alone (points, paired) | "
          "hinton train acc* |\n|---|---|---|---|---|---|---|")
    for r in rows:
        train = [a for a in r["train_accs"] if a is not None]
        protocol = r["temperature"] == own_t and r["teacher"] == base.teacher_zoo
        print(f"| {r['teacher']} | {r['temperature']:g}{' (protocol)' if protocol else ''} | {r['entropy']:.3f} | "
              f"{r['max_prob']:.3f} | {sum(r['accs']) / len(r['accs']):.4f} | "
              f"{100 * sum(r['vs_alone']) / len(r['vs_alone']):+.2f} | "
              f"{sum(train) / len(train) if train else float('nan'):.4f} |")
    print("\n\\* last epoch, on the training images as trained on")
    write_json({"setting": asdict(base), "temperatures": args.temperatures, "seeds": seeds, "teachers": teachers,
                "alone": [r["test_acc"] for r in alone], "rows": rows, "versions": versions()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
