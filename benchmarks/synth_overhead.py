"""Synthesis overhead: ms per iteration and peak extra memory of each method beside its floor, measured
in the same run. Inversion methods: one teacher forward + backward to the input pixels, teacher frozen,
no hooks (ADI: that plus the same for the student). The adversarial round (5 student steps + 1
generator step): the sum of the bare passes it needs, each timed alone (`round_floor`). One step of the
memory-bank methods (fast, nayer: a unit of `--iterations` steps, clone and meta update included, divided by
the steps): one bare step of the same generator (width 64, latent 256, pixels) with the teacher and the
student forward and backward to the generator and z, and an Adam step (`bank_floor`).

    python -m benchmarks.synth_overhead [--cases resnet34:64,resnet34:256,lenet5_bn:256] [--iterations 5]
        [--methods floor,student_floor,stat,deepinversion,adi,round_floor,adversarial] [--ops]

graph_floor, graph_student_floor (CUDA): the floors captured as one CUDA graph each, the compute floor with no host in the way; where it ran,
a column gives each method's ms against it. --cuda-graphs replays the inversion methods' iterations as CUDA graphs.

--ops adds the ATen ops one iteration dispatches (benchmarks.op_count) and their ratio to the floor's, for the
floors and the inversion methods (stat, deepinversion, adi): exact counts, the host work a GPU waits on.

Each (model, batch, method) runs in its own subprocess so its peak memory is its own: peak RSS on CPU
(ru_maxrss minus the RSS after building the model), torch.cuda.max_memory_allocated on CUDA. Random
weights; 3×32×32 inputs for ResNets, 1×28×28 for LeNets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ["floor", "graph_floor", "student_floor", "graph_student_floor", "stat", "deepinversion", "adi", "round_floor", "adversarial", "bank_floor", "fast",
           "nayer"]
FLOORS = {"floor": (), "graph_floor": (), "student_floor": (), "graph_student_floor": (), "round_floor": (), "adi": ("floor", "student_floor"),
          "adversarial": ("round_floor",), "bank_floor": (), "fast": ("bank_floor",),
          "nayer": ("bank_floor",)}  # what each row is measured against


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _warm_lazy_imports() -> None:
    """One Adam and one SGD step on a dummy parameter, so torch's lazy imports land before the baseline RSS."""
    p = torch.zeros(4, requires_grad=True)
    for opt in (torch.optim.Adam([p]), torch.optim.SGD([p], lr=0.1, momentum=0.9)):
        p.sum().backward()
        opt.step()


def _timed(step, iterations: int, dev: torch.device) -> float:
    """ms per call of `step` after one warm-up call."""
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iterations):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / iterations


def _round_floor(teacher, student, generator, batch: int, iterations: int, dev: torch.device) -> float:
    """The bare passes one adversarial round needs, timed one by one and summed with their multiplicities.

    5 x (G forward, teacher forward, student forward + backward + step) without gradients to G, then
    1 x (G forward, teacher and student forward + backward to their inputs, G backward + step).
    """
    z = torch.randn(batch, 100, device=dev)
    opt_s = torch.optim.SGD([p for p in student.parameters()], lr=1e-3, momentum=0.9)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    with torch.no_grad():
        x0 = generator(z)
        t0 = teacher(x0)

    def g_fwd():
        with torch.no_grad():
            generator(z)

    def t_fwd():
        with torch.no_grad():
            teacher(x0)

    def s_train():
        loss = torch.nn.functional.l1_loss(student(x0), t0)
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()

    def to_input(model):
        def step():
            x = x0.detach().requires_grad_(True)
            model(x).sum().backward()
        return step

    def g_train():
        out = generator(z)
        opt_g.zero_grad(set_to_none=True)
        out.backward(torch.ones_like(out))
        opt_g.step()

    ms = {name: _timed(fn, iterations, dev) for name, fn in (("g_fwd", g_fwd), ("t_fwd", t_fwd), ("s_train", s_train),
                                                              ("g_train", g_train))}
    for p in student.parameters():
        p.requires_grad_(False)
    ms["t_input"] = _timed(to_input(teacher), iterations, dev)
    ms["s_input"] = _timed(to_input(student), iterations, dev)
    for p in student.parameters():
        p.requires_grad_(True)
    return 5 * (ms["g_fwd"] + ms["t_fwd"] + ms["s_train"]) + ms["g_train"] + ms["t_input"] + ms["s_input"]


def _setup(model_name: str, batch: int, device: str, amp: str = "off", cuda_graphs: bool = False) -> tuple:
    """(teacher, student, context, targets, image shape) of a case: random weights, seed 0."""
    from dfkd.distill.models import create_model
    from dfkd.store.toolbox.compute import amp_dtype
    from dfkd.synth.methods import SynthContext

    torch.manual_seed(0)
    shape = (3, 32, 32) if "resnet" in model_name or "wrn" in model_name else (1, 28, 28)
    dev = torch.device(device)
    teacher = create_model(model_name, 10, shape[0], shape[1]).to(dev).eval()
    student = create_model("resnet18" if "resnet" in model_name else "lenet5_half", 10, shape[0], shape[1]).to(dev).eval()
    ctx = SynthContext(teacher, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0], dev, student=student,
                       amp=amp_dtype(amp, dev), cuda_graphs=cuda_graphs)
    return teacher, student, ctx, torch.arange(batch, device=dev) % 10, shape


def count(model_name: str, batch: int, method: str, device: str) -> float | None:
    """ATen ops per iteration (inversion methods) or per pass (their floors); None for the other methods."""
    from benchmarks.op_count import floor_ops, inversion_ops
    from dfkd.synth.engine import frozen
    from dfkd.synth.methods import create_method

    if method not in ("floor", "student_floor", "stat", "deepinversion", "adi"):
        return None
    teacher, student, ctx, targets, shape = _setup(model_name, batch, device)
    with frozen(teacher, student):
        if method in ("floor", "student_floor"):
            x = torch.randn(batch, *shape, device=targets.device)
            return floor_ops(teacher if method == "floor" else student, x, targets)
        m = create_method(method, ctx, {"jitter": 2, "flip": True})
        try:
            return inversion_ops(m, targets)
        finally:
            m.close()


def measure(model_name: str, batch: int, method: str, iterations: int, device: str, amp: str = "off",
            cuda_graphs: bool = False) -> dict:
    """Run in a fresh process: ms per iteration (or per adversarial round) and peak extra memory (MiB)."""
    from dfkd.synth.engine import frozen
    from dfkd.synth.generators import create_generator
    from dfkd.synth.methods import create_method

    teacher, student, ctx, targets, shape = _setup(model_name, batch, device, amp, cuda_graphs)
    dev = targets.device
    if dev.type == "cuda":
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    _warm_lazy_imports()  # the first optimizer step imports ~160 MB of torch modules: not the method's memory
    base = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    adversarial = method in ("round_floor", "adversarial")
    with frozen(teacher, None if adversarial else student):
        if method in ("floor", "student_floor"):
            model = teacher if method == "floor" else student
            x = torch.randn(batch, *shape, device=dev, requires_grad=True)

            def step() -> None:
                with ctx.autocast():
                    loss = torch.nn.functional.cross_entropy(model(x).float(), targets)
                x.grad = None
                loss.backward()
            ms = _timed(step, iterations, dev)
        elif method in ("graph_floor", "graph_student_floor"):
            from dfkd.store.toolbox.cuda_graph import GraphedStep

            x = torch.randn(batch, *shape, device=dev, requires_grad=True)
            model = teacher if method == "graph_floor" else student
            ctx.cuda_graphs = True  # autocast without its weight cache, which a graph cannot capture

            def step() -> torch.Tensor:
                with ctx.autocast():
                    loss = torch.nn.functional.cross_entropy(model(x).float(), targets)
                x.grad = None
                loss.backward()
                return loss
            ms = _timed(GraphedStep(step, ()), iterations, dev)
        elif method == "round_floor":
            student.train()
            g = create_generator("dcgan", 100, shape).to(dev, memory_format=torch.channels_last).train()  # as the method's
            ms = _round_floor(teacher, student, g, batch, iterations, dev)
        elif method == "adversarial":
            student.train()
            m = create_method(method, ctx, {"batch_size": batch, "latent_dim": 100})
            m.setup()
            m.generator_model.train()
            z_gen = torch.Generator().manual_seed(0)
            ms = _timed(lambda: m.train_round(z_gen), iterations, dev)
            m.close()
        elif method == "bank_floor":
            g = create_generator("dcgan", 256, shape, 64, head="tanh").to(dev).train()
            z = torch.randn(batch, 256, device=dev, requires_grad=True)
            opt = torch.optim.Adam([*g.parameters(), z], lr=1e-3)

            def step() -> None:
                x = ctx.normalize(g(z))
                with ctx.autocast():
                    loss = (torch.nn.functional.cross_entropy(teacher(x).float(), targets)
                            + student(x).float().logsumexp(1).mean())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            ms = _timed(step, iterations, dev)
        elif method in ("fast", "nayer"):
            m = create_method(method, ctx, {"g_steps": iterations, "warmup": 0, "kd_steps": 0})
            m.init_chain(0)
            gen = torch.Generator().manual_seed(0)
            m.make_batch(targets, gen)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m.make_batch(targets, gen)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t) / iterations
            m.close()
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
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="processes per method; medians are reported")
    p.add_argument("--amp", default="off", help="off, auto, bf16 or fp16 (CUDA only): autocast for floors and methods")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", action="store_true", help="also count the ATen ops per iteration (exact, any machine)")
    p.add_argument("--cuda-graphs", action="store_true", help="inversion iterations replayed as CUDA graphs")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model:batch:method, internal
    args = p.parse_args()
    if args.one:
        model, batch, method = args.one.split(":")
        out = measure(model, int(batch), method, args.iterations, args.device, args.amp, args.cuda_graphs)
        if args.ops:
            out["ops"] = count(model, int(batch), method, args.device)
        print(json.dumps(out))
        return
    print(f"synth overhead on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
          f"torch {torch.__version__}, amp {args.amp}, cuda graphs {'on' if args.cuda_graphs else 'off'}, {args.iterations} timed iterations after one warm-up, median of {args.repeats} "
          "processes per method")
    print()
    graph_col = "graph_floor" in args.methods.split(",")
    ops_head = (" ops/iter | x floor ops |", "---:|---:|") if args.ops else ("", "")
    print("| teacher | batch | method | ms/iter | x its floor |" + (" x graphed floor |" if graph_col else "")
          + " peak extra MiB | x floor memory |" + ops_head[0])
    print("|---|---:|---|---:|---:|" + ("---:|" if graph_col else "") + "---:|---:|" + ops_head[1])
    methods = args.methods.split(",")
    for case in args.cases.split(","):
        model, batch = case.split(":")
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.repeats):  # alternate the order so drift in machine state hits every method alike
            for method in (methods if r % 2 == 0 else methods[::-1]):
                out = subprocess.run([sys.executable, "-m", "benchmarks.synth_overhead", "--one",
                                      f"{model}:{batch}:{method}", "--iterations", str(args.iterations),
                                      "--device", args.device, "--amp", args.amp, *(["--ops"] if args.ops else []),
                                      *(["--cuda-graphs"] if args.cuda_graphs else [])],
                                     capture_output=True, text=True, check=True)
                runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
        res = {m: {k: statistics.median(v[k] for v in vs) for k in ("ms", "peak_mb")} for m, vs in runs.items()}
        for m, vs in runs.items():
            res[m]["ops"] = vs[0].get("ops")  # exact: the same in every process
        for method in methods:
            r = res[method]
            floor = FLOORS.get(method, ("floor",))
            if not floor or not all(f in res for f in floor):  # a floor itself, or its floor was not run
                ops = f" {r['ops']:.0f} | |" if args.ops and r["ops"] is not None else (" | |" if args.ops else "")
                print(f"| {model} | {batch} | {method} | {r['ms']:.1f} | |" + (" |" if graph_col else "")
                      + f" {r['peak_mb']:.0f} | |" + ops, flush=True)
                continue
            f_ms = sum(res[f]["ms"] for f in floor)
            f_mb = sum(res[f]["peak_mb"] for f in floor)
            name = method + (f" (vs {' + '.join(floor)})" if floor != ("floor",) else "")
            ops = ""
            if args.ops:
                f_ops = [res[f]["ops"] for f in floor]
                ops = (f" {r['ops']:.0f} | {r['ops'] / sum(f_ops):.2f} |" if r["ops"] is not None
                       and None not in f_ops else " | |")
            graphed = ""
            if graph_col:  # against the floors captured as graphs: the compute floor
                g_floor = ["graph_" + f for f in floor]
                graphed = (f" {r['ms'] / sum(res[g]['ms'] for g in g_floor):.2f} |" if all(g in res for g in g_floor)
                           else " |")
            print(f"| {model} | {batch} | {name} | {r['ms']:.1f} | {r['ms'] / f_ms:.2f} |" + graphed
                  + f" {r['peak_mb']:.0f} | {r['peak_mb'] / max(f_mb, 1e-9):.2f} |" + ops, flush=True)

if __name__ == "__main__":
    main()
