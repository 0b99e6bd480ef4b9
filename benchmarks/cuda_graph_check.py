"""On a CUDA device: the images of an inversion batch made with the iteration replayed as a CUDA graph against
the same batch made eagerly (same seed), and both loops' ms per iteration.

    python -m benchmarks.cuda_graph_check [--model resnet34] [--batch 256] [--iterations 50] [--amp off]

Prints one table row per method; the images agree to float tolerance (the graph replays the same kernels; only
atomics in index_select's backward may reorder on another card).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from dfkd.distill.models import create_model
    from dfkd.store.toolbox.compute import amp_dtype
    from dfkd.synth.engine import frozen
    from dfkd.synth.methods import SynthContext, create_method

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet34")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--amp", default="off")
    p.add_argument("--methods", default="stat,deepinversion,adi")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    teacher = create_model(args.model, 10, 3, 32).to(dev, memory_format=torch.channels_last).eval()
    student = create_model("resnet18", 10, 3, 32).to(dev, memory_format=torch.channels_last).eval()
    targets = torch.arange(args.batch, device=dev) % 10
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} batch {args.batch}, "
          f"{args.iterations} iterations, amp {args.amp}")
    print("| method | eager ms/iter | graphed ms/iter | speed-up | max abs pixel difference |")
    print("|---|---:|---:|---:|---:|")
    with frozen(teacher, student):
        for method in args.methods.split(","):
            out, ms = {}, {}
            for graphs in (False, True):
                ctx = SynthContext(teacher, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, dev, student=student,
                                   amp=amp_dtype(args.amp, dev), cuda_graphs=graphs)
                m = create_method(method, ctx, {"iterations": args.iterations})
                m.synthesize(targets, torch.Generator().manual_seed(1))  # warm-up (and the capture)
                torch.cuda.synchronize()
                t = time.perf_counter()
                out[graphs], _ = m.synthesize(targets, torch.Generator().manual_seed(2))
                torch.cuda.synchronize()
                ms[graphs] = 1000 * (time.perf_counter() - t) / args.iterations
                m.close()
            diff = (out[True] - out[False]).abs().max().item()
            print(f"| {method} | {ms[False]:.2f} | {ms[True]:.2f} | {ms[False] / ms[True]:.2f} | {diff:.2e} |",
                  flush=True)


if __name__ == "__main__":
    main()
