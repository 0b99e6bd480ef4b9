"""The end of `dfkd run`: a Markdown table of every student per store, and a PNG plot of accuracy
against synthesis time (drawn with Pillow, which torchvision already brings)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import statistics
from typing import Any, Callable

from ..distill.checkpoint import load_model
from ..store.toolbox import fs


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def rows_of(runner: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(teacher row, one row per student per store) from the stages' results."""
    teachers = {}
    for t in runner.p.teachers:
        if not os.path.isfile(runner.teacher_path(t.name)):  # not trained yet (a partial run with --only)
            continue
        _, spec, metrics = load_model(runner.teacher_path(t.name), "teacher", runner.p.model_code)
        teachers[t.name] = {"arch": spec.arch, "test_top1": metrics.get("test_top1")}
    synth = {s.key[len("synth:"):]: s for s in runner.stages if s.key.startswith("synth:")}
    methods = {s.name: s.method for s in runner.p.synth}
    of = {s.name: s.teacher or runner.p.teachers[0].name for s in runner.p.synth}
    # stores whose sections differ only in name and seed are one setting: the report shows their spread
    setting = {s.name: json.dumps({**dataclasses.asdict(s), "name": None, "seed": None}, sort_keys=True)
               for s in runner.p.synth}
    rows = []
    for stage in runner.stages:
        if not stage.key.startswith("distill:"):
            continue
        dname, _, sname = stage.key[len("distill:"):].partition("/")
        parts = sname.split("+")  # a union of stores: teacher of its stores, synthesis time of them all
        seconds = [synth[p].result.get("seconds") if p in synth else None for p in parts]
        for student, r in stage.result.get("students", {}).items():
            rows.append({"teacher": of.get(parts[0], "?"), "distill": dname, "store": sname,
                         "method": methods.get(sname, "?") if len(parts) == 1 else "mix", "student": student,
                         "arch": r["arch"], "parameters": r["parameters"], "test_top1": r["test_top1"],
                         "images": stage.result.get("images"),
                         "synth_s": None if None in seconds else sum(seconds), "distill_s": stage.result.get("seconds"),
                         "setting": (setting.get(sname), dname, student)})
    for sname, st in synth.items():  # generator methods' proxy students, trained during synthesis
        if "student_top1" in st.result:
            rows.append({"teacher": of[sname], "distill": "(proxy)", "store": sname, "method": methods[sname], "student": "proxy student",
                         "arch": st.result.get("student_arch", "?"), "parameters": None,
                         "test_top1": st.result["student_top1"], "images": None,
                         "synth_s": st.result.get("seconds"), "distill_s": None,
                         "setting": (setting[sname], "(proxy)", "proxy student")})
    return teachers, rows


def with_real_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's top-1 over that of the same teacher's and architecture's student distilled from a `real`
    store of the same image count (real-data KD at that count): the ratio the quality targets are stated in.
    A proxy student is set against real-data KD at its store's image count."""
    real: dict[tuple, float] = {}
    for r in rows:  # the same [[distill]] section's real store first (the same recipe), else any section's
        if r["method"] == "real" and r["distill"] != "(proxy)" and r["test_top1"]:
            real[(r["teacher"], r["arch"], r["images"], r["distill"])] = r["test_top1"]
            real.setdefault((r["teacher"], r["arch"], r["images"], None), r["test_top1"])
    count = {r["store"]: r["images"] for r in rows if r["distill"] != "(proxy)"}
    out = []
    for r in rows:
        key = (r["teacher"], r["arch"], r["images"] if r["images"] is not None else count.get(r["store"]))
        ref = real.get((*key, r["distill"]), real.get((*key, None)))
        out.append({**r, "vs_real": r["test_top1"] / ref if ref and r["test_top1"] is not None else None})
    return out


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Settings run with several synthesis seeds: their stores, mean and sd of top-1 and of the real-data ratio."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("setting") and r["setting"][0] is not None and r["test_top1"] is not None:
            groups.setdefault(r["setting"], []).append(r)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        top1 = [m["test_top1"] for m in members]
        ratios = [m["vs_real"] for m in members if m.get("vs_real") is not None]
        out.append({"teacher": members[0]["teacher"], "method": members[0]["method"],
                    "student": members[0]["student"], "stores": ", ".join(m["store"] for m in members),
                    "mean": statistics.mean(top1), "sd": statistics.stdev(top1),
                    "ratio": statistics.mean(ratios) if len(ratios) == len(members) else None,
                    "synth_s": statistics.mean([m["synth_s"] or 0.0 for m in members])})
    return out


def markdown(runner: Any, teachers: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    about = "; ".join(f"{n} = {t['arch']}, test top-1 {_pct(t['test_top1'])}" for n, t in teachers.items())
    head = (f"# {runner.p.run.name}: data-free distillation report\n\n"
            f"Data {runner.p.data.name}. Teachers: {about}. Students: last epoch's top-1 on the real test split.\n\n")
    lines = ["| teacher | store | method | student | arch | test top-1 | / real-data KD | images | synthesis s | "
             "distillation s |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    rated = with_real_ratio(rows)
    for r in rated:
        ratio = "-" if r["vs_real"] is None else f"{r['vs_real']:.2f}"
        lines.append(f"| {r['teacher']} | {r['store']} | {r['method']} | {r['student']} | {r['arch']} | {_pct(r['test_top1'])} | "
                     f"{ratio} | {r['images'] if r['images'] is not None else '-'} | {fmt(r['synth_s'])} | "
                     f"{fmt(r['distill_s'])} |")
    groups = seed_groups(rated)
    if groups:
        lines += ["", "Over synthesis seeds (stores whose sections differ only in name and seed):", "",
                  "| teacher | method | student | stores | test top-1, mean +- sd | / real-data KD | synthesis s (mean) |",
                  "|---|---|---|---|---:|---:|---:|"]
        for g in groups:
            ratio = "-" if g["ratio"] is None else f"{g['ratio']:.3f}"
            lines.append(f"| {g['teacher']} | {g['method']} | {g['student']} | {g['stores']} | {_pct(g['mean'])} +- "
                         f"{100 * g['sd']:.2f} | {ratio} | {g['synth_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Scatter of test top-1 (y) against synthesis seconds (x), one labelled point per student and store, a
    marker per method (matplotlib, drawn off-screen)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    pts = [r for r in rows if r["test_top1"] is not None]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    markers = dict(zip(sorted({r["method"] for r in pts}), "osD^vP*X<>"))
    for i, r in enumerate(pts):
        x, y = r["synth_s"] or 0.0, r["test_top1"]
        ax.scatter(x, y, marker=markers[r["method"]], color=f"C{i % 10}", zorder=3,
                   label=f"{r['store']} / {r['student']}")
    ax.set_xlabel("synthesis time (s)")
    ax.set_ylabel("student test top-1")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if pts:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fs.write_atomic(path, buf.getvalue())


def write_report(runner: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    """Write <out>/report.md and <out>/report.png, print the table; returns the rows."""
    teachers, rows = rows_of(runner)
    text = markdown(runner, teachers, rows)
    md, png = runner.path("report.md"), runner.path("report.png")
    fs.write_text_atomic(md, text)
    plot(rows, png, f"{runner.p.run.name}: student top-1 vs synthesis time")
    echo("")
    echo(text)
    echo(f"report: {md}, plot: {png}")
    return {"teachers": teachers, "rows": rows}
