"""Synthesis overhead: ms per iteration and peak extra memory of each inversion method beside the floor
(one teacher forward + backward to the input pixels, teacher parameters frozen, no hooks), measured in
the same run.

    python -m benchmarks.synth_overhead [--cases resnet34:64,resnet34:256,lenet5_bn:256] [--iterations 5]

Each (model, batch, method) runs in its own subprocess so its peak memory is its own: peak RSS on CPU
(ru_maxrss minus the RSS after building the model), torch.cuda.max_memory_allocated on CUDA. Random
weights; 3×32×32 inputs for ResNets, 1×28×28 for LeNets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

METHODS = ["floor", "stat", "deepinversion", "adi"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model_name: str, batch: int, method: str, iterations: int, device: str) -> dict:
    """Run in a fresh process: ms per iteration and peak extra memory (MiB)."""
    from distill.models import create_model
    from synth.engine import frozen
    from synth.methods import SynthContext, create_method

    torch.manual_seed(0)
    shape = (3, 32, 32) if "resnet" in model_name or "wrn" in model_name else (1, 28, 28)
    dev = torch.device(device)
    teacher = create_model(model_name, 10, shape[0], shape[1]).to(dev).eval()
    student = create_model("resnet18" if "resnet" in model_name else "lenet5_half", 10, shape[0], shape[1]).to(dev).eval()
    ctx = SynthContext(teacher, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0], dev, student=student)
    targets = torch.arange(batch, device=dev) % 10
    base = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with frozen(teacher, student):
        if method == "floor":
            x = torch.randn(batch, *shape, device=dev, requires_grad=True)

            def step() -> None:
                loss = torch.nn.functional.cross_entropy(teacher(x), targets)
                x.grad = None
                loss.backward()
            step()  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iterations):
                step()
        else:
            m = create_method(method, ctx, {"iterations": 1, "jitter": 2, "flip": True})
            m.synthesize(targets, torch.Generator().manual_seed(0))  # warm-up
            m.config.iterations = iterations
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m.synthesize(targets, torch.Generator().manual_seed(0))
            m.close()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - t) / iterations
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"ms": ms, "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="resnet34:64,resnet34:256,lenet5_bn:256")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model:batch:method, internal
    args = p.parse_args()
    if args.one:
        model, batch, method = args.one.split(":")
        print(json.dumps(measure(model, int(batch), method, args.iterations, args.device)))
        return
    print(f"synth overhead on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
          f"torch {torch.__version__}, {args.iterations} timed iterations after one warm-up")
    print()
    print("| teacher | batch | method | ms/iter | x floor | peak extra MiB | x floor memory |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        model, batch = case.split(":")
        res = {}
        for method in METHODS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.synth_overhead", "--one", f"{model}:{batch}:{method}",
                                  "--iterations", str(args.iterations), "--device", args.device],
                                 capture_output=True, text=True, check=True)
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
            f = res["floor"]
            r = res[method]
            print(f"| {model} | {batch} | {method} | {r['ms']:.1f} | {r['ms'] / f['ms']:.2f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] / max(f['peak_mb'], 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    main()
