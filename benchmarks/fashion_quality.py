"""Data-free quality on Fashion-MNIST: each synthesis method's store distilled into a LeNet-5-half,
beside real-data KD with the same number of images and the noise baseline.

    python -m benchmarks.fashion_quality --teacher-a A.pt --teacher-b B.pt [--num-images 6144]
        [--iterations 200] [--epochs 100] [--dir bench_out/fmnist] [--only A|B] [--methods m1,m2]

Setting A: LeNet-5-BN teacher -> DAFL LeNet-5-half (BN statistics serve stat/deepinversion/adi).
Setting B: LeNet-5 teacher without BN -> ZSKD LeNet-5-half, served by `stat --stats` and `spectral`
with a record made on the training split. Accuracy is the last epoch's on the official 10k test set.
Stores are reused when complete (same settings), so a rerun only redoes what changed.
"""

from __future__ import annotations

import argparse
import os
import time


from dfkd.distill.augment import normalize
from dfkd.distill.checkpoint import load_model
from dfkd.distill.sources import StoreSource
from dfkd.distill.trainer import StudentSpec, TrainConfig, Trainer
from dfkd.pipelines.real_data import load_data
from dfkd.pipelines.jobs import fill_real_store
from dfkd.synth.engine import SynthConfig, synthesize
from dfkd.synth.record import TeacherStats, record

SETTINGS = {"A": ("lenet5_half", ["real", "noise", "stat", "deepinversion", "adi"]),
            "B": ("lenet5_half_zskd", ["real", "noise", "stat", "spectral"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-a", required=True)
    p.add_argument("--teacher-b", required=True)
    p.add_argument("--num-images", type=int, default=6144)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--dir", default="bench_out/fmnist")
    p.add_argument("--only", choices=sorted(SETTINGS), default=None)
    p.add_argument("--methods", default=None, help="comma-separated subset")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    data = load_data("fashion-mnist")
    rows = []
    for setting, (student, methods) in SETTINGS.items():
        if args.only and setting != args.only:
            continue
        tpath = args.teacher_a if setting == "A" else args.teacher_b
        teacher, spec, tmeta = load_model(tpath, "teacher")
        rec = None
        if setting == "B":
            rpath = os.path.join(args.dir, "B.record.safetensors")
            if not os.path.exists(rpath):
                x, y = data.train_images, data.train_labels
                record(teacher, ((normalize(x[i:i + 1000], spec.mean, spec.std), y[i:i + 1000])
                                 for i in range(0, len(x), 1000)), num_classes=10, data="fashion-mnist").save(rpath)
            rec = TeacherStats.load(rpath)
        adi_student = None
        for method in methods:
            if args.methods and method not in args.methods.split(","):
                continue
            path = os.path.join(args.dir, f"{setting}-{method}.zarr")
            t0 = time.perf_counter()
            if method == "real":
                if not os.path.exists(path):
                    fill_real_store(path, tpath, data, args.num_images, seed=0)
            else:
                hp = {} if method == "noise" else {"iterations": args.iterations}
                synthesize(teacher, method, SynthConfig(num_images=args.num_images, out=path, resume=True,
                                                        progress=False),
                           image_shape=spec.image_shape, num_classes=10, mean=spec.mean, std=spec.std, hparams=hp,
                           record=rec if method in ("spectral",) or (method == "stat" and setting == "B") else None,
                           student=adi_student)
            synth_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            tr = Trainer(StoreSource(path, 256), [StudentSpec(student, "adam", 1e-3)],
                         TrainConfig(epochs=args.epochs, eval_every=args.epochs, progress=False),
                         eval_data=(data.test_images, data.test_labels))
            tr.fit()
            distill_s = time.perf_counter() - t0
            acc = tr.students[0].history[-1]["test_top1"]
            if method == "deepinversion":
                adi_student = tr.students[0].model.eval()  # ADI competes with the student DeepInversion made
            rows.append((setting, tmeta.get("test_top1", float("nan")), student, method, acc, synth_s, distill_s))
            print(f"{setting} {method}: {100 * acc:.2f}% (synth {synth_s:.0f} s, distill {distill_s:.0f} s)", flush=True)
    print()
    print(f"Fashion-MNIST data-free quality: {args.num_images} images, {args.iterations} iterations per batch, "
          f"{args.epochs} distillation epochs (Adam 1e-3, KD T=4), last-epoch top-1 on the 10k test set")
    print()
    print("| setting | teacher top-1 | student | method | student top-1 | / real-data KD | synthesis s | distillation s |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    real = {r[0]: r[4] for r in rows if r[3] == "real"}
    for s, tacc, stu, m, acc, ss, ds in rows:
        ratio = f"{acc / real[s]:.2f}" if s in real else "-"
        print(f"| {s} | {100 * tacc:.2f}% | {stu} | {m} | {100 * acc:.2f}% | {ratio} | {ss:.0f} | {ds:.0f} |")


if __name__ == "__main__":
    main()
