"""The report: markdown tables of the newest records per device and workload, and
``results/REPORT.md`` with its charts (``charts``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from sdrt.benchmarks.charts import render_chart, sampler_grid
from sdrt.benchmarks.fidelity import REFERENCE
from sdrt.benchmarks.machine import device_label
from sdrt.benchmarks.records import COMPONENTS, END_TO_END, latest


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _fid(f: dict | None) -> str:
    if not f:
        return "—"
    if f.get("reference"):
        return "reference"
    against = "" if f.get("against") == REFERENCE else f" vs `{f.get('against')}`"
    if f.get("max_abs") == 0:
        return "identical" + against
    psnr = f"{f['psnr']:.1f} dB" if f.get("psnr") is not None else "—"
    return f"{psnr} / {f['max_abs']:.3g}{against}"


def render_markdown(records: list[dict]) -> str:
    """A markdown table per device and workload from the newest records."""
    recs = latest(records)
    if not recs:
        return "No benchmark records.\n"
    lines = ["Times are medians after warm-up; *s/image* is one 1-image end-to-end generation (text encoder, "
             "sampling, VAE decode), *it/s* is sampling steps per second. Fidelity: PSNR / max-abs of each "
             f"backend's output against the reference of the same run (`{REFERENCE}`; cells name any other) on "
             "the same weights, inputs and noise (the UNet step on its raw output, the image in 8-bit levels). Peak host memory: the worker's peak resident set "
             "while measuring, the loaded weights included.", ""]
    by_device: dict[str, list[dict]] = {}
    for r in recs:
        by_device.setdefault(device_label(r["device"]), []).append(r)
    for device in sorted(by_device, key=lambda d: (d.startswith("CPU"), d)):
        rows = by_device[device]
        lines.append(f"### {device}")
        lines.append("")
        lines.append(_machine_line(rows))
        lines.append("")
        workloads: dict[tuple, list[dict]] = {}
        for r in rows:
            w = r.get("workload") or {}
            workloads.setdefault((w.get("name"), w.get("width"), w.get("height")), []).append(r)
        for (name, width, height), wrows in sorted(workloads.items(), key=lambda kv: str(kv[0])):
            lines += _workload_table(name, width, height, wrows)
    return "\n".join(lines) + "\n"


def _machine_line(rows: list[dict]) -> str:
    r = max(rows, key=lambda x: x.get("date") or "")
    m, v = r.get("machine") or {}, r.get("versions") or {}
    libs = ", ".join(f"{k} {v[k]}" for k in ("sdrt", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers",
                                              "transformers") if v.get(k))
    dates = sorted({(x.get("date") or "")[:10] for x in rows if x.get("date")})
    parts = [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB, {m.get('platform')}, "
             f"Python {m.get('python')}", libs]
    if dates:
        parts.append(f"measured {' to '.join(dict.fromkeys([dates[0], dates[-1]]))}")
    return "; ".join(parts) + "."


def _workload_table(name, width, height, rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    steps = sorted({r["steps"] for r in ok if r.get("measurement") == END_TO_END and r.get("steps")})
    desc = next((r["workload"].get("description") for r in rows if r["workload"].get("description")), "")
    sampler = next((f"{r.get('sampler')}, CFG {r.get('cfg_scale'):g}" for r in ok if r.get("sampler")), "")
    header = ["backend", "precision", "text encoder ms", "UNet step ms", "VAE decode ms"]
    for s in steps:
        header += [f"{s} steps s/image", f"{s} steps it/s"]
    header += ["peak host MB", "peak GPU MB", "UNet step vs torch", "image vs torch", "note"]
    threads = sorted({r["threads"] for r in ok if r.get("threads")})
    conditions = sorted({r["conditions"] for r in ok if r.get("conditions")})
    about = [f"{'thread' if threads == [1] else 'threads'} {', '.join(map(str, threads))}"] if threads else []
    about += [f"conditions: {c}" for c in conditions]
    out = [f"#### {name}, {width}x{height}" + (f": {desc}" if desc else "") + (f"; {sampler}" if sampler else ""),
           ""] + ([f"{'; '.join(about)[0].upper()}{'; '.join(about)[1:]}.", ""] if about else []) + [
           "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 3) + ["---"]) + "|"]
    backends_seen: dict[tuple, list[dict]] = {}
    for r in rows:
        backends_seen.setdefault((r.get("backend"), r.get("precision")), []).append(r)

    def order(key):
        rs = backends_seen[key]
        return (not any(r.get("status") == "ok" for r in rs), key[0] or "", key[1] or "")

    for key in sorted(backends_seen, key=order):
        rs = backends_seen[key]
        by_m = {(r.get("measurement"), r.get("steps")): r for r in rs}
        cells = [f"`{key[0]}`", key[1] or "—"]
        for m in COMPONENTS:
            r = by_m.get((m, None))
            cells.append(_fmt(r.get("ms")) if r and r.get("status") == "ok" else "—")
        for s in steps:
            r = by_m.get((END_TO_END, s))
            good = r and r.get("status") == "ok"
            cells += [_fmt(r.get("s_per_image")) if good else "—", _fmt(r.get("it_s")) if good else "—"]
        host = [r["peak_host_mb"] for r in rs if r.get("peak_host_mb") and r.get("status") == "ok"]
        dev = [r["peak_device_mb"] for r in rs if r.get("peak_device_mb") and r.get("status") == "ok"]
        cells += [_fmt(max(host)) if host else "—", _fmt(max(dev)) if dev else "—"]
        unet = by_m.get(("unet_step", None))
        cells.append(_fid(unet.get("fidelity")) if unet else "—")
        images = [by_m[(END_TO_END, s)] for s in steps if (END_TO_END, s) in by_m]
        image = next((r for r in images if r.get("fidelity")), None)
        cells.append((_fid(image["fidelity"]) + (f" ({image['steps']} steps)" if len(steps) > 1 else ""))
                     if image else "—")
        notes = sorted({r["note"] for r in rs if r.get("note") and r.get("status") != "ok"})
        cells.append("; ".join(notes))
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    out.append("")
    return out


def report_markdown(records: list[dict]) -> str:
    """The text of REPORT.md: a heading, the chart and ``render_markdown``'s tables."""
    return ("# sdrt benchmark results\n\nRendered by `sdrt bench --report` from the records in this folder (the "
            "newest record per device, workload, backend and measurement).\n\n"
            "![render time by device and backend](render_time.png)\n\n" + render_markdown(records))


def write_report(records: list[dict], out_dir: str | Path, *, grid_bundle: str | Path | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """REPORT.md, render_time.png (with matplotlib) and sampler_steps.png (with a grid bundle) in
    ``out_dir``; returns the paths written and notes on what was not."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    md = out_dir / "REPORT.md"
    _write_text(md, report_markdown(records))
    written.append(md)
    chart = out_dir / "render_time.png"
    if render_chart(records, chart):
        written.append(chart)
    else:
        notes.append("the chart needs matplotlib (pip install 'sdrt[bench]'); wrote the markdown only"
                     if importlib.util.find_spec("matplotlib") is None else "no timing records to chart")
    if grid_bundle is not None:
        grid = out_dir / "sampler_steps.png"
        image = sampler_grid(grid_bundle, progress=progress)
        notes += [f"sampler grid cell failed: {f}" for f in image.info.get("failures", [])]
        tmp = grid.with_name(f".{grid.name}.partial")
        image.save(tmp, format="PNG", optimize=True)
        tmp.replace(grid)
        written.append(grid)
    return {"written": written, "notes": notes}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)
