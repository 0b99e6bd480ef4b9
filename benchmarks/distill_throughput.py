"""Distillation throughput: ms per step for 1 and 3 students from a store, beside the bare student
forward+backward+step (the floor) measured in the same run, stored logits beside an online teacher, and
a store's view labels (one of 8 stored flip-crop views per image, pixels re-created in the loader).

    python -m benchmarks.distill_throughput [--num-samples 20000] [--batch-size 256] [--epochs 1] [--rounds 3]
        [--cuda-graphs]

--cuda-graphs (CUDA): the trainer replays each student's step as a CUDA graph, and the floors are captured as
graphs too (the compute floor, no host in the way). The trainer clips gradients as `dfkd distill` does by default
(--clip-grad-norm; 0 off); the floors do not clip.

Teacher LeNet-5-BN and students LeNet-5-half (DAFL), LeNet-5-half (ZSKD), LeNet-5 at 1×28×28, random
weights and random pixels (speed does not depend on them). Times are medians over epochs after a
warm-up epoch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from dfkd import store
from dfkd.distill.augment import normalize
from dfkd.distill.losses import Objective
from dfkd.distill.models import create_model
from dfkd.distill.sources import StoreSource, TensorSource
from dfkd.distill.trainer import StudentSpec, TrainConfig, Trainer
from dfkd.pipelines.settings import DistillSettings

SHAPE, K = (1, 28, 28), 10
MEAN, STD = (0.286,), (0.353,)
STUDENTS = ["lenet5_half", "lenet5_half_zskd", "lenet5"]
RUN = {"device": "cpu", "amp": "off", "cuda_graphs": False, "clip_grad_norm": 0.0}  # set from the command line


def make_store(path: str, images: np.ndarray, logits: np.ndarray, views: int = 0) -> None:
    """A store of these images and logits; with `views`, view labels too (the logits repeated: speed only)."""
    from dfkd.synth.view_labels import with_views

    meta = store.StoreMeta(num_samples=len(images), image_shape=SHAPE, num_classes=K, unit_size=1024, mean=MEAN, std=STD)
    if views:
        meta = with_views(meta, views, "flip-crop")
    w = store.create(path, meta, overwrite=True)
    for u in w.pending_units():
        lo, hi = w.unit_range(u)
        v = np.repeat(logits[lo:hi, None], views, 1) if views else None
        w.write_unit(u, images[lo:hi], logits[lo:hi], np.full(hi - lo, -1), v)
    w.finalize()


def run_ms(source, students: list[str], epochs: int, teacher=None, augment: str = "none") -> float:
    """Median ms per training step over the epochs after the first (warm-up)."""
    tr = Trainer(source, [StudentSpec(s) for s in students],
                 TrainConfig(epochs=epochs + 1, progress=False, augment=augment, **RUN), teacher=teacher)
    tr.fit()
    return 1000 * statistics.median(r["seconds"] for r in tr.students[0].history[1:]) / len(source)


def floor_ms(students: list[str], images: torch.Tensor, logits: torch.Tensor, batch: int, steps: int) -> float:
    """Bare forward + KD loss + backward + optimizer step of each student on batches already in memory."""
    from dfkd.store.toolbox.compute import amp_dtype

    dev = torch.device(RUN["device"])
    amp = amp_dtype(RUN["amp"], dev)
    models = [create_model(s, K, 1, 28).to(dev) for s in students]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    obj = Objective()
    x = normalize(images[:batch].to(dev), MEAN, STD)
    t = logits[:batch].float().to(dev)
    graphs = RUN["cuda_graphs"] and dev.type == "cuda" and amp != torch.float16
    if graphs:
        opts = [torch.optim.SGD(m.parameters(), lr=torch.tensor(0.01, device=dev), momentum=0.9, fused=True)
                for m in models]

    def one(m, o) -> None:
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None,
                            cache_enabled=False if graphs else None):
            loss = obj(m(x).float(), t, None)
        o.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(o)
        scaler.update()
    if graphs:
        from dfkd.store.toolbox.cuda_graph import GraphedStep

        steps_of = [GraphedStep(lambda m=m, o=o: one(m, o), ()) for m, o in zip(models, opts)]
    else:
        steps_of = [lambda m=m, o=o: one(m, o) for m, o in zip(models, opts)]
    times = []
    for i in range(steps + 5):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in steps_of:
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def data_path_ms(source, epochs: int) -> float:
    """Median ms per batch to read a store batch and turn it into normalized float input, with no model."""
    times = []
    for e in range(epochs + 1):
        source.set_epoch(e)
        t = time.perf_counter()
        n = 0
        for images, logits, _ in source:
            normalize(images, MEAN, STD), logits.float()
            n += 1
        if e:
            times.append((time.perf_counter() - t) / n)
    return 1000 * statistics.median(times)


def online_source(tensors: torch.Tensor, batch: int) -> TensorSource:
    """Real-data source for classical KD (the teacher relabels every batch online)."""
    return TensorSource(tensors, torch.zeros(len(tensors), dtype=torch.long), K, MEAN, STD, batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1, help="measured epochs per run (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="off", help="off, auto, bf16 or fp16 (CUDA only)")
    p.add_argument("--cuda-graphs", action="store_true", help="students' steps (and the floors) as CUDA graphs")
    p.add_argument("--clip-grad-norm", type=float, default=DistillSettings().clip_grad_norm,
                   help="the trainer's gradient clip (dfkd distill's default; 0 off)")
    p.add_argument("--only", action="append", default=None,
                   help="run only the cases whose name contains this (repeatable; the floors always run)")
    args = p.parse_args()
    RUN.update(device=args.device, amp=args.amp, cuda_graphs=args.cuda_graphs, clip_grad_norm=args.clip_grad_norm)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_samples, *SHAPE), dtype=np.uint8)
    teacher = create_model("lenet5_bn", K, 1, 28).eval().to(args.device)
    with torch.no_grad():
        logits = torch.cat([teacher(normalize(torch.from_numpy(images[i:i + 4096]).to(args.device), MEAN, STD)).cpu()
                            for i in range(0, len(images), 4096)])
    tensors = torch.from_numpy(images)
    b, e = args.batch_size, args.epochs
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.zarr")
        make_store(path, images, logits.numpy())
        vpath = os.path.join(d, "views.zarr")
        make_store(vpath, images, logits.numpy(), views=8)
        src = lambda: StoreSource(path, b)
        vsrc = lambda: StoreSource(vpath, b, views=True)
        cases = {  # every case once per round, rounds alternate the order, so all see the same machine state
            "floor, 1 student": lambda: floor_ms(STUDENTS[:1], tensors, logits, b, 60),
            "floor, 3 students": lambda: floor_ms(STUDENTS, tensors, logits, b, 60),
            "stored, 1 student": lambda: run_ms(src(), STUDENTS[:1], e),
            "stored, 3 students one pass": lambda: run_ms(src(), STUDENTS, e),
            "stored, 3 separate runs": lambda: sum(run_ms(src(), [s], e) for s in STUDENTS),
            "online, 1 student": lambda: run_ms(online_source(tensors, b), STUDENTS[:1], e, teacher),
            "online, 3 students one pass": lambda: run_ms(online_source(tensors, b), STUDENTS, e, teacher),
            "online, 3 separate runs": lambda: sum(run_ms(online_source(tensors, b), [s], e, teacher) for s in STUDENTS),
            "data path": lambda: data_path_ms(src(), e),
            "stored + flip-crop, 1 student": lambda: run_ms(src(), STUDENTS[:1], e, augment="flip-crop"),
            "views, 1 student": lambda: run_ms(vsrc(), STUDENTS[:1], e),
            "views, 3 students one pass": lambda: run_ms(vsrc(), STUDENTS, e),
            "views data path": lambda: data_path_ms(vsrc(), e),
        }
        if args.only:
            cases = {k: v for k, v in cases.items() if k.startswith("floor") or any(o in k for o in args.only)}
        for r in range(args.rounds):
            for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
                runs.setdefault(name, []).append(cases[name]())
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = lambda a, c: statistics.median(x / y for x, y in zip(runs[a], runs[c]))
    print(f"distill throughput: {args.num_samples} samples 1x28x28, batch {b}, teacher lenet5_bn, students "
          f"{', '.join(STUDENTS)}; {os.cpu_count()} cores {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, amp {args.amp}, cuda graphs "
          f"{'on' if args.cuda_graphs else 'off'}; medians of {args.rounds} interleaved rounds")
    print()
    print("| run | ms/step | floor ms/step | vs floor | one pass / separate runs |")
    print("|---|---:|---:|---:|---:|")
    f1, f3 = med["floor, 1 student"], med["floor, 3 students"]
    rows = (("stored, 1 student", f1), ("stored, 3 students one pass", f3), ("stored, 3 separate runs", f3),
                        ("online, 1 student", f1), ("online, 3 students one pass", f3), ("online, 3 separate runs", f3),
                        ("stored + flip-crop, 1 student", f1), ("views, 1 student", f1),
                        ("views, 3 students one pass", f3))
    for name, floor in ((n, f) for n, f in rows if n in med):
        rel = ""
        if name.endswith("one pass") and name.replace("students one pass", "separate runs") in runs:
            rel = f"{ratio(name, name.replace('students one pass', 'separate runs')):.2f}"
        print(f"| {name} | {med[name]:.2f} | {floor:.2f} | {med[name] / floor:.2f}x | {rel} |")
    for key, what in (("data path", "data path alone (store read + normalize, no model)"),
                      ("views data path", "views data path alone (store read + view pixels + normalize)")):
        if key in med:
            print(f"| {what} | {med[key]:.2f} | {f1:.2f} | {100 * med[key] / f1:.1f}% of the 1-student floor | |")
    print()
    for kind in (k for k in ("stored", "online") if f"{k}, 3 separate runs" in runs):
        per_round = [a / b for a, b in zip(runs[f"{kind}, 3 students one pass"], runs[f"{kind}, 3 separate runs"])]
        print(f"{kind}: one pass / separate runs per round: {', '.join(f'{r:.2f}' for r in per_round)}")
    if "online, 1 student" in med and "stored, 1 student" in med:
        print(f"stored logits vs online teacher, 1 student: {med['online, 1 student'] / med['stored, 1 student']:.2f}x faster")
    if "views, 1 student" in med and "stored + flip-crop, 1 student" in med:
        print(f"views vs stored logits (no augmentation), 1 student: {ratio('views, 1 student', 'stored, 1 student'):.2f}x; "
              f"vs stored + flip-crop: {ratio('views, 1 student', 'stored + flip-crop, 1 student'):.2f}x")


if __name__ == "__main__":
    main()
