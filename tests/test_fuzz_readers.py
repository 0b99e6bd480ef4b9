"""Seeded mutations of small valid files (issue 33): every reader gives a result or one DfkdError line, in bounded
time and memory, whatever the bytes. A failure names the seed, so it replays."""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import signal
import tracemalloc
import shutil

import pytest
import torch

from dfkd import store
from dfkd.distill.checkpoint import load_model
from dfkd.store.toolbox.errors import DfkdError
from tests.helpers import fill, small_meta
from tests.synth_helpers import save_tiny_teacher

CASES = 500  # mutated inputs per reader
SECONDS = 5  # each read must end within this
OVERHEAD = 1 << 20  # what reading any store costs whatever its size (parsed metadata, zarr's objects): peak ~140 KB


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _json_paths(doc, path=()):
    """Every (path, value) in a JSON tree."""
    yield path, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _json_paths(v, path + (i,))


ODD_VALUES = [-1, 0, 1, 2**31, 10**12, 10**30, -10**12, 255.5, 1e308, float("nan"), float("inf"), "", "x" * 300,
              "float16", [], [1, 2], [10**9, 10**9, 10**9], {}, {"a": 1}, None, True, False]


def mutate_json(doc, rng: random.Random):
    """A copy of `doc` with one value replaced by an odd one, a key dropped, or an unknown key added."""
    doc = copy.deepcopy(doc)
    paths = [p for p, _ in _json_paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    action = rng.random()
    if action < 0.8:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.append(rng.choice(ODD_VALUES))
    return doc


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Bit flips, a truncation, a run of random bytes, or a 12-byte field of random octal-looking digits."""
    b = bytearray(data)
    action = rng.randrange(4)
    if action == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif action == 1:
        return bytes(b[:rng.randrange(len(b))])
    elif action == 2:
        i = rng.randrange(len(b))
        b[i:i + 16] = bytes(rng.randrange(256) for _ in range(16))
    else:  # a tar number field (size at 124 or checksum at 148 of some header block) with other digits
        block = rng.randrange(max(1, len(b) // 512)) * 512
        field = rng.choice([124, 148])
        digits = rng.choice([b"-0000001000", b"77777777777", b"00000000000", b"+1", b"   12   ", b"99999999999"])
        b[block + field:block + field + len(digits)] = digits
    return bytes(b)


def run_bounded(fn, what: str, failures: list, memory: int | None = None) -> None:
    """fn() must return, or raise a one-line DfkdError, within SECONDS (and, given `memory`, allocate at most that
    many bytes at its peak, as tracemalloc counts Python's and numpy's allocations)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    if memory is not None:
        tracemalloc.start()
    try:
        fn()
    except DfkdError as e:
        if "\n" in str(e):
            failures.append(f"{what}: a multi-line error: {e!r:.200}")
    except Hang:
        failures.append(f"{what}: did not end within {SECONDS} s")
    except Exception as e:  # noqa: BLE001 - a traceback is the finding
        failures.append(f"{what}: {type(e).__name__}: {e!s:.200}")
    finally:
        signal.alarm(0)
        if memory is not None:
            if tracemalloc.get_traced_memory()[1] > memory:
                failures.append(f"{what}: allocated {tracemalloc.get_traced_memory()[1]:,} bytes, over {memory:,}")
            tracemalloc.stop()


def tree_size(root: str) -> int:
    """Bytes of every file under `root`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(root) for f in names)


def read_everything(path: str) -> None:
    reader = store.open(path)
    for u in range(reader.meta.num_units):
        if reader.done_mask()[u]:
            reader.read_unit(u)
    reader.backend.audit()


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    paths = {}
    for kind in ("wds", "zarr"):
        p = str(root / f"s.{kind}")
        w = store.create(p, small_meta(num_samples=40, unit_size=16))
        fill(w)
        w.finalize()
        paths[kind] = p
    paths["teacher"] = str(root / "t.pt")
    save_tiny_teacher(paths["teacher"])
    return paths


def _check(failures: list, before: int) -> None:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert not failures, f"{len(failures)} of {CASES} mutations failed, e.g.:\n" + "\n".join(failures[:8])
    assert grown < 500_000, f"reading mutated files grew the peak memory by {grown / 1024:.0f} MiB"


@pytest.mark.parametrize("target", ["wds:shard", "wds:meta.json", "zarr:zarr.json", "zarr:chunk"])
def test_mutated_store_files_give_a_result_or_one_line(tmp_path, originals, target):
    kind, what = target.split(":")
    src = originals[kind]
    rel = {"shard": "shard-000001.tar", "meta.json": "meta.json", "zarr.json": "zarr.json",
           "chunk": os.path.join("logits", "c", "1", "0")}[what]
    original = open(os.path.join(src, rel), "rb").read()
    failures: list[str] = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work = str(tmp_path / os.path.basename(src))
    shutil.copytree(src, work)
    target_file = os.path.join(work, rel)
    for seed in range(CASES):
        rng = random.Random(seed)
        if what.endswith(".json"):
            doc = json.loads(original)
            data = json.dumps(mutate_json(doc, rng)).encode()
        else:
            data = mutate_bytes(original, rng)
        with open(target_file, "wb") as f:
            f.write(data)
        run_bounded(lambda: read_everything(work), f"{target} seed {seed}", failures,
                    memory=10 * tree_size(work) + OVERHEAD)  # 10x the bytes on disk: nothing a header merely declares
    _check(failures, before)


def test_mutated_checkpoints_give_a_model_or_one_line(tmp_path, originals):
    original = torch.load(originals["teacher"], weights_only=True)
    raw = open(originals["teacher"], "rb").read()
    failures: list[str] = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = str(tmp_path / "t.pt")
    for seed in range(CASES):
        rng = random.Random(seed)
        if seed % 2:
            torch.save({**original, "spec": mutate_json(original["spec"], rng)}, path)
        else:
            open(path, "wb").write(mutate_bytes(raw, rng))
        run_bounded(lambda: load_model(path, "teacher"), f"checkpoint seed {seed}", failures)
    _check(failures, before)
