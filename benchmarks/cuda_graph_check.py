"""On a CUDA device: the images of an inversion batch made with the iteration replayed as a CUDA graph against
the same batch made eagerly (same seed), and both loops' ms per iteration.

    python -m benchmarks.cuda_graph_check [--model resnet34] [--batch 256] [--iterations 50] [--amp off]
        [--units 1,2,4]

Prints one table row per method; the images agree to float tolerance (the graph replays the same kernels; only
atomics in index_select's backward may reorder on another card). With --units, a second table: images x
iterations per second with G units of --batch images in flight, eager and graphed (each unit's images are the
ones it gets alone, tests/test_synth.py).
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
    p.add_argument("--device", default="cuda", help="cpu runs both columns eagerly (a smoke test of this script)")
    p.add_argument("--units", default="", help="comma-separated units in flight for the throughput table")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    teacher = create_model(args.model, 10, 3, 32).to(dev, memory_format=torch.channels_last).eval()
    student = create_model("resnet18", 10, 3, 32).to(dev, memory_format=torch.channels_last).eval()
    targets = torch.arange(args.batch, device=dev) % 10
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}, {args.model} batch {args.batch}, "
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
                sync()
                t = time.perf_counter()
                out[graphs], _ = m.synthesize(targets, torch.Generator().manual_seed(2))
                sync()
                ms[graphs] = 1000 * (time.perf_counter() - t) / args.iterations
                m.close()
            diff = (out[True] - out[False]).abs().max().item()
            print(f"| {method} | {ms[False]:.2f} | {ms[True]:.2f} | {ms[False] / ms[True]:.2f} | {diff:.2e} |",
                  flush=True)
        if args.units:
            print()
            print("| method | units in flight | images | eager ms/iter | eager img x it/s | graphed ms/iter | "
                  "graphed img x it/s | peak GiB (graphed) |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for method in args.methods.split(","):
                for g in (int(v) for v in args.units.split(",")):
                    row = []
                    for graphs in (False, True):
                        ctx = SynthContext(teacher, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, dev, student=student,
                                           amp=amp_dtype(args.amp, dev), cuda_graphs=graphs)
                        m = create_method(method, ctx, {"iterations": args.iterations})
                        gens = lambda seed: [torch.Generator().manual_seed(seed + i) for i in range(g)]
                        m.synthesize_units([targets] * g, gens(10))  # warm-up (and the capture)
                        sync()
                        if dev.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        t = time.perf_counter()
                        m.synthesize_units([targets] * g, gens(20))
                        sync()
                        ms_it = 1000 * (time.perf_counter() - t) / args.iterations
                        row += [f"{ms_it:.2f}", f"{g * args.batch * 1000 / ms_it:,.0f}"]
                        m.close()
                    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
                    print(f"| {method} | {g} | {g * args.batch} | {' | '.join(row)} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
