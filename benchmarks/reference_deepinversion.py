"""dfkd's DeepInversion against NVlabs' own CIFAR loop, on the same card, teacher and batch (issue 32's side by side).

NVlabs' code is under its own licence and is no part of dfkd: point --reference at a scratch copy of the `cifar10/`
folder of https://github.com/NVlabs/DeepInversion (on the GPU machine, carry it under .gpu/, which git ignores):

    python -m benchmarks.reference_deepinversion --reference .gpu/DeepInversion/cifar10 [--iterations 40]

Their `get_images` runs as shipped (their BN hook, losses, Adam, a `loss.item()` every iteration), fp32, batch 256
(their targets are hard-wired to 256), on dfkd's ResNet-34 CIFAR teacher (random weights: speed only), in a
temporary folder (it saves images there). Each call hooks the net again and never unhooks, so each run gets a
fresh copy of the teacher. ms per iteration come from two runs of different lengths, so setup and read-out cancel.
dfkd's deepinversion runs eager, as a CUDA graph, and as a graph with 4 units in flight. CUDA only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import sys
import tempfile
import time
from typing import Callable

import torch

BATCH = 256  # NVlabs' CIFAR script labels exactly 256 images


def per_iteration(run: Callable[[int], None], short: int, long: int) -> float:
    """ms per iteration: the difference of two timed runs over the difference of their lengths."""
    times = []
    for n in (short, long):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run(n)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * (times[1] - times[0]) / (long - short)


def reference_run(folder: str, teacher: torch.nn.Module, student: torch.nn.Module) -> Callable[[int], None]:
    """NVlabs' get_images for n iterations, each call on fresh copies of the nets, inside a temporary folder."""
    sys.path.insert(0, os.path.abspath(folder))
    module = importlib.import_module("deepinversion_cifar10")
    scratch = tempfile.mkdtemp(prefix="nvlabs-di-")

    def run(n: int) -> None:
        net, stu = copy.deepcopy(teacher), copy.deepcopy(student)
        inputs = torch.randn((BATCH, 3, 32, 32), requires_grad=True, device="cuda")
        optimizer = torch.optim.Adam([inputs], lr=0.1)
        with open(os.devnull, "w") as null, contextlib.chdir(scratch), contextlib.redirect_stdout(null):
            module.get_images(net=net, bs=BATCH, epochs=n, idx=-1, net_student=stu, prefix="out",
                              competitive_scale=0.0, use_amp=False, optimizer=optimizer, inputs=inputs,
                              bn_reg_scale=1e2, var_scale=2.5e-5, random_labels=False, l2_coeff=0.0)
    os.makedirs(os.path.join(scratch, "out"), exist_ok=True)
    os.makedirs(os.path.join(scratch, "outbest_images"), exist_ok=True)
    return run


def dfkd_run(teacher: torch.nn.Module, graphs: bool, units: int, device: str = "cuda") -> Callable[[int], None]:
    """dfkd's deepinversion for n iterations on `units` batches in flight (the capture made by a warm-up first)."""
    from dfkd.synth.methods import SynthContext, create_method

    ctx = SynthContext(teacher, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, torch.device(device), cuda_graphs=graphs)
    targets = torch.arange(BATCH, device=device) % 10
    method = create_method("deepinversion", ctx, {"iterations": 2})

    def run(n: int) -> None:
        method.config.iterations = n
        method.synthesize_units([targets] * units, [torch.Generator().manual_seed(i) for i in range(units)])
    run(3)  # warm-up, and the graph's capture
    return run


def main() -> None:
    from dfkd.distill.models import create_model
    from dfkd.synth.modes import frozen

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="NVlabs DeepInversion's cifar10/ folder (a scratch copy)")
    p.add_argument("--iterations", type=int, default=40, help="the longer run's iterations (the shorter: a quarter)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this side by side needs a CUDA device (NVlabs' loop is written for one)")
    torch.backends.cudnn.benchmark = True  # as NVlabs' script sets it
    torch.manual_seed(0)
    teacher = create_model("resnet34", 10, 3, 32).cuda().eval()
    student = create_model("resnet18", 10, 3, 32).cuda().eval()
    short, long = max(2, args.iterations // 4), args.iterations
    rows = [("NVlabs get_images (their loop, fp32)", 1, per_iteration(reference_run(args.reference, teacher, student),
                                                                      short, long))]
    nhwc = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    with frozen(nhwc):
        for name, graphs, units in (("dfkd deepinversion, eager", False, 1), ("dfkd deepinversion, CUDA graph", True, 1),
                                    ("dfkd deepinversion, CUDA graph, 4 units in flight", True, 4)):
            rows.append((name, units, per_iteration(dfkd_run(nhwc, graphs, units), short, long)))
    base = BATCH / rows[0][2]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, ResNet-34 CIFAR, batch {BATCH} per unit, fp32, "
          f"iterations {short} and {long}")
    print("| loop | units | ms/iter | images x it/s | vs NVlabs |")
    print("|---|---:|---:|---:|---:|")
    for name, units, ms in rows:
        rate = BATCH * units / ms
        print(f"| {name} | {units} | {ms:.2f} | {1000 * rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
