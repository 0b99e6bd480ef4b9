"""What a store student learns with view labels, beside the same student with the teacher online.

    python -m benchmarks.view_labels --teacher runs/fashion_mnist/A.pt --store A-fast=runs/.../A-fast.zarr \
        [--store NAME=PATH ...] [--views 8] [--variants logits,views,teacher] [--epochs 367] \
        [--student lenet5_half] [--optimizer sgd --lr 0.02 --temperature 20] --work bench_out/views

For each store and variant one student is distilled with one recipe and scored on Fashion-MNIST's test
split at its last epoch:
  logits   stored logits of the plain image, flip-crop views that reuse them (no teacher)
  views    the store's view labels: one of K stored views per image and epoch (no teacher); the store is
           copied to <work>/<name>-v<K>.zarr and labelled there, the original is left as it is
  teacher  flip-crop views relabelled by the online teacher (the reference the views try to match)
The table gives top-1, training seconds, stored bytes per image and the teacher forwards each variant spent.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from dfkd import store
from dfkd.distill.checkpoint import load_model
from dfkd.pipelines.jobs import DistillJob, run_distill
from dfkd.pipelines.real_data import load_data
from dfkd.store.toolbox import fs
from dfkd.store.convert import convert
from dfkd.synth.view_labels import label_store


def bytes_per_image(path: str) -> float:
    """Stored bytes (every file of the store) per image."""
    total = sum(len(b) for b in _files(path))
    return total / store.open(path).meta.num_samples


def _files(path: str):
    for d, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                yield f.read()


def labelled_copy(path: str, name: str, teacher: torch.nn.Module, views: int, work: str,
                  mode: str = "flip-crop") -> tuple[str, float]:
    """A copy of the store with K view labels (made once, reused); returns it and the labelling seconds."""
    dst = os.path.join(work, f"{name}-v{views}{'' if mode == 'flip-crop' else '-' + mode}.zarr")
    if fs.exists(dst) and store.open(dst).views_complete and store.open(dst).meta.views == views:
        return dst, 0.0
    convert(path, dst, overwrite=True)
    t0 = time.perf_counter()
    label_store(dst, teacher, views, mode=mode, overwrite=True, show=False)
    return dst, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--store", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--views", type=int, action="append", default=None, help="K for the views variant; repeatable")
    ap.add_argument("--variants", default="logits,views,teacher")
    ap.add_argument("--view-mode", default="flip-crop", help="how the views variant's views are drawn: flip-crop or crop")
    ap.add_argument("--student", action="append", default=None)
    ap.add_argument("--epochs", type=int, default=367)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--work", default="bench_out/views")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    students = args.student or ["lenet5_half"]
    ks = args.views or [8]
    teacher, _, _ = load_model(args.teacher, "teacher")
    real = load_data(args.data)
    evaluation = (real.test_images, real.test_labels)
    rows = []
    for item in args.store:
        name, _, path = item.partition("=")
        n = store.open(path).meta.num_samples
        for variant in args.variants.split(","):
            for k in (ks if variant == "views" else [0]):
                src, label_s = (labelled_copy(path, name, teacher, k, args.work, args.view_mode) if variant == "views"
                                else (path, 0.0))
                tag = f"{name}-{variant}" + (f"{k}" if k else "") + ("" if args.view_mode == "flip-crop" else args.view_mode)
                job = DistillJob(src, students, os.path.join(args.work, "runs", tag), epochs=args.epochs,
                                 batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                                 temperature=args.temperature, augment="none" if variant == "views" else "flip-crop",
                                 seed=args.seed, views=variant == "views", progress=False, eval_every=args.epochs)
                m = run_distill(job, evaluation, teacher if variant == "teacher" else None)
                forwards = {"logits": n, "views": n * (1 + k), "teacher": n + n * args.epochs * len(students)}[variant]
                for s, r in m["students"].items():
                    rows.append((name, variant, k or "-", s, f"{100 * r['final']['test_top1']:.2f}%",
                                 f"{sum(h['seconds'] for h in r['history']):.1f}", f"{label_s:.1f}",
                                 f"{bytes_per_image(src):.0f}", f"{forwards:,}"))
                print(" | ".join(map(str, rows[-1])), flush=True)
    print(f"\n{platform.node()} {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.optimizer} lr {args.lr} T {args.temperature}, {args.epochs} epochs, batch {args.batch_size}, "
          f"seed {args.seed}, views {args.view_mode}")
    head = ("store", "variant", "K", "student", "test top-1", "train s", "label s", "bytes/image", "teacher forwards")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
