"""The report's images: render time by device and backend (matplotlib), and the sampler vs steps grid."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from sdrt.benchmarks.machine import isa_tier
from sdrt.benchmarks.records import END_TO_END, latest, one_line
from sdrt.runtime.errors import SdrtError

GRID_STEPS = (2, 4, 8, 16, 32, 64)


def _device_name(device: dict) -> str:
    """A chart's short device name: a CPU's model with its instruction set's tier where recorded."""
    tier = isa_tier(device.get("isa")) if device.get("kind") == "cpu" else None
    return f"{device.get('name')} ({tier})" if tier else str(device.get("name"))


def render_chart(records: list[dict], path: str | Path) -> bool:
    """A bar chart of render time by device and backend (seconds per image, end to end; the UNet
    step where a workload has no end-to-end records). False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    recs = [r for r in latest(records) if r.get("status") == "ok"]
    panels = []
    for name, width, height in sorted({(r["workload"]["name"], r["workload"].get("width") or 0,
                                        r["workload"].get("height") or 0) for r in recs}):
        rs = [r for r in recs if (r["workload"]["name"], r["workload"].get("width") or 0,
                                  r["workload"].get("height") or 0) == (name, width, height)]
        e2e = [r for r in rs if r.get("measurement") == END_TO_END]
        if e2e:
            steps = min({r["steps"] for r in e2e}, key=lambda s: (s != 20, s))
            bars = [(r, r["s_per_image"]) for r in e2e if r["steps"] == steps]
            title, unit = f"{name}: seconds per image, {steps} steps", "s / image"
        else:
            bars = [(r, r["ms"] / 1000) for r in rs if r.get("measurement") == "unet_step"]
            title, unit = f"{name}: seconds per guided UNet step", "s / step"
        if bars:
            panels.append((f"{title} ({width}x{height})", unit, sorted(bars, key=lambda b: -b[1])))
    if not panels:
        return False
    heights = [max(1.2, 0.42 * len(b) + 0.9) for _, _, b in panels]
    fig = Figure(figsize=(9, sum(heights) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    colors = {"sdrt": "#2b6cb0", "torch": "#dd6b20", "tensorrt": "#2f855a"}
    for ax, (title, unit, bars) in zip(axes, panels):
        labels = [f"{_device_name(r['device'])} · {r['backend']} {r['precision']}" for r, _ in bars]
        values = [v for _, v in bars]
        ax.barh(labels, values, color=[colors.get(r.get("runtime"), "#718096") for r, _ in bars])
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel(f"{unit} (lower is better)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_xlim(0, max(values) * 1.18)
    fig.suptitle("sdrt: render time by device and backend (blue: sdrt on ONNX Runtime, orange: PyTorch)",
                 fontsize=10)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    return True


def sampler_grid(bundle: str | Path, *, samplers: Iterable[str] | None = None, steps: Iterable[int] = GRID_STEPS,
                 prompt: str = "a red circle on a blue background", seed: int = 1, cfg_scale: float = 7.0,
                 cell: int | None = None, progress: Callable[[str, int, int], None] | None = None):
    """A "sampler vs steps" grid image: one row per sampler (every sampler of ``sampling.SAMPLERS``
    unless named), one column per step count, the same prompt and seed in every cell; cells are
    ``cell`` pixels (default: the model's own size, kept between 64 and 256)."""
    from PIL import Image, ImageDraw, ImageFont

    from sdrt.runtime import sampling
    from sdrt.runtime.pipeline import GenerationParams, Pipeline

    pipe = Pipeline(bundle)
    cell = cell or min(256, max(64, pipe.bundle.default_size[0]))
    names = list(samplers) if samplers else list(sampling.SAMPLERS)
    steps = list(steps)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()
    label_w = max(120, 8 * max(len(n) for n in names) + 16)
    top = 28
    grid = Image.new("RGB", (label_w + cell * len(steps), top + cell * len(names)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((8, top // 2), "sampler / steps", fill="black", font=font, anchor="lm")
    for j, s in enumerate(steps):
        draw.text((label_w + j * cell + cell // 2, top // 2), str(s), fill="black", font=font, anchor="mm")
    total, done = len(names) * len(steps), 0
    failures = []
    for i, name in enumerate(names):
        draw.text((8, top + i * cell + cell // 2), name, fill="black", font=font, anchor="lm")
        for j, s in enumerate(steps):
            if progress:
                progress(f"{name}, {s} steps", done, total)
            box = (label_w + j * cell, top + i * cell)
            try:
                p = GenerationParams(prompt, steps=s, sampler_name=name, seed=seed, cfg_scale=cfg_scale)
                image = pipe.generate(p)[0]
                grid.paste(image.image.resize((cell, cell), Image.Resampling.LANCZOS), box)
            except Exception as e:  # one failing sampler is shown in its cells, not fatal to the grid
                failures.append(f"{name}, {s} steps: {one_line(e)}")
                refused = isinstance(e, SdrtError)  # e.g. too few steps for the sampler's order
                color = "gray" if refused else "red"
                draw.rectangle((*box, box[0] + cell - 1, box[1] + cell - 1), outline=color)
                draw.text((box[0] + 4, box[1] + 4), "n/a" if refused else "error", fill=color, font=font)
                if not refused:
                    draw.text((box[0] + 4, box[1] + 20), type(e).__name__[:16], fill=color, font=font)
            done += 1
    if progress:
        progress("done", total, total)
    grid.info["failures"] = failures
    return grid
