"""The end of `dfkd run`: a Markdown table of every student per store, and a PNG plot of accuracy
against synthesis time (drawn with Pillow, which torchvision already brings)."""

from __future__ import annotations

import io
import os
from typing import Any, Callable

from distill.checkpoint import load_model
from store import fs


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
    rows = []
    for stage in runner.stages:
        if not stage.key.startswith("distill:"):
            continue
        dname, _, sname = stage.key[len("distill:"):].partition("/")
        sres = synth[sname].result if sname in synth else {}
        for student, r in stage.result.get("students", {}).items():
            rows.append({"teacher": of.get(sname, "?"), "distill": dname, "store": sname, "method": methods.get(sname, "?"), "student": student,
                         "arch": r["arch"], "parameters": r["parameters"], "test_top1": r["test_top1"],
                         "images": stage.result.get("images"), "synth_s": sres.get("seconds"),
                         "distill_s": stage.result.get("seconds")})
    for sname, st in synth.items():  # generator methods' proxy students, trained during synthesis
        if "student_top1" in st.result:
            rows.append({"teacher": of[sname], "distill": "(proxy)", "store": sname, "method": methods[sname], "student": "proxy student",
                         "arch": st.result.get("student_arch", "?"), "parameters": None,
                         "test_top1": st.result["student_top1"], "images": None,
                         "synth_s": st.result.get("seconds"), "distill_s": None})
    return teachers, rows


def with_real_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's top-1 over that of the same teacher's and architecture's student distilled from the
    `real` store (real-data KD at the same image count): the ratio the quality targets are stated in."""
    real = {(r["teacher"], r["arch"]): r["test_top1"] for r in rows
            if r["method"] == "real" and r["distill"] != "(proxy)" and r["test_top1"]}
    return [{**r, "vs_real": (r["test_top1"] / real[(r["teacher"], r["arch"])]
                              if (r["teacher"], r["arch"]) in real and r["test_top1"] is not None else None)}
            for r in rows]


def markdown(runner: Any, teachers: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    about = "; ".join(f"{n} = {t['arch']}, test top-1 {_pct(t['test_top1'])}" for n, t in teachers.items())
    head = (f"# {runner.p.run.name}: data-free distillation report\n\n"
            f"Data {runner.p.data.name}. Teachers: {about}. Students: last epoch's top-1 on the real test split.\n\n")
    lines = ["| teacher | store | method | student | arch | test top-1 | / real-data KD | images | synthesis s | "
             "distillation s |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    for r in with_real_ratio(rows):
        ratio = "-" if r["vs_real"] is None else f"{r['vs_real']:.2f}"
        lines.append(f"| {r['teacher']} | {r['store']} | {r['method']} | {r['student']} | {r['arch']} | {_pct(r['test_top1'])} | "
                     f"{ratio} | {r['images'] if r['images'] is not None else '-'} | {fmt(r['synth_s'])} | "
                     f"{fmt(r['distill_s'])} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Scatter of test top-1 (y) against synthesis seconds (x), one labelled point per student and store."""
    from PIL import Image, ImageDraw

    pts = [(r["synth_s"] or 0.0, r["test_top1"] or 0.0, f"{r['store']}/{r['student']}") for r in rows
           if r["test_top1"] is not None]
    w, h, m, right = 900, 480, 60, 200  # room on the right for the labels
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xmax = max([p[0] for p in pts] + [1.0]) * 1.1
    X = lambda s: m + (w - m - right) * s / xmax
    Y = lambda a: h - m - (h - 2 * m) * a
    d.line([(m, m), (m, h - m), (w - right, h - m)], fill="black")
    for k in range(0, 11, 2):
        y = Y(k / 10)
        d.line([(m - 4, y), (m, y)], fill="black")
        d.text((m - 40, y - 6), f"{10 * k}%", fill="black")
    for k in range(6):
        x = X(xmax * k / 5)
        d.line([(x, h - m), (x, h - m + 4)], fill="black")
        d.text((x - 10, h - m + 8), f"{xmax * k / 5:.0f}", fill="black")
    d.text(((w - right) // 2 - 40, h - 25), "synthesis time (s)", fill="black")
    d.text((8, 10), title, fill="black")
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (s, a, label) in enumerate(pts):
        c = palette[i % len(palette)]
        d.ellipse([X(s) - 4, Y(a) - 4, X(s) + 4, Y(a) + 4], fill=c)
        d.text((X(s) + 6, Y(a) - 6 + 10 * (i % 2)), label, fill=c)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
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
