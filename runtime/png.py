"""PNG output with the webui's ``parameters`` text chunk and ``NNNNN-SEED.png`` file names."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin


def quote(value) -> str:
    """The webui's ``quote``: JSON-quote values holding a comma, colon or newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """``prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: ...`` as the webui writes it.

    ``params`` is ordered; entries whose value is None are left out, as in ``create_infotext``.
    """
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Read back (prompt, negative prompt, params) from a ``parameters`` text."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 or re.match(r"^\w[\w ]*: ", lines[-1]) else ""
    body = lines[:-1] if params_line else lines
    prompt, negative, in_negative = [], [], False
    for ln in body:
        if ln.startswith("Negative prompt:"):
            in_negative = True
            ln = ln[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(ln)
    params = {}
    for m in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', params_line):
        key, value = m.group(1).strip(), m.group(2).strip()
        params[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt), "\n".join(negative), params


def next_sequence_number(folder: Path) -> int:
    """One past the highest leading number of the file names in ``folder`` (the webui's counter)."""
    best = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            head = name.split("-", 1)[0].split(".", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
    return best + 1


def save_png(image: Image.Image, folder: str | Path, seed: int, parameters: str) -> Path:
    """Write ``NNNNN-SEED.png`` atomically (temporary file, then a link that never overwrites)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=".sdrt-", suffix=".png.partial", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the image private
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        number = next_sequence_number(folder)
        while True:
            target = folder / f"{number:05}-{seed}.png"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)
