"""PNG output with the webui's ``parameters`` text chunk and ``NNNNN-SEED.png`` file names."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin


def quote(value) -> str:
    """The webui's ``quote``: JSON-quote values holding a comma, colon or newline.

    sdrt also quotes values holding a double quote (the webui writes them bare): a bare value that
    begins and ends with one would be unquoted on reading. The webui reads both forms back alike.
    """
    text = str(value)
    if not any(c in text for c in ',:\n"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """``prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: ...`` as the webui writes it.

    ``params`` is ordered; entries whose value is None are left out, as in ``create_infotext``.
    """
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


# One ``key: value`` entry of the parameters line, with the webui's grammar (``re_param_code``): a key
# of 2+ characters that starts with a letter, digit or _ and may hold spaces, - and /; a value that is
# either a JSON string or anything up to the next comma.
PARAM = re.compile(r"""
    \s* (\w[\w\ /-]+) : \s*
    ( "(?: \\. | [^\\"] )+" | [^,]* )
    (?: , | $ )""", re.VERBOSE)
IMAGE_SIZE = re.compile(r"(\d+)x(\d+)")


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Read back (prompt, negative prompt, params) from a ``parameters`` text, by the rules of the
    webui's ``parse_generation_parameters``.

    The last line holds the params only if it has at least three ``key: value`` entries; otherwise
    it belongs to the prompt. Lines are stripped; those before ``Negative prompt:`` are the prompt,
    the rest the negative prompt, each joined with newlines. Values are JSON-unquoted, and a
    ``WxH`` value also gives ``<key>-1`` and ``<key>-2`` (``Size-1``, ``Size-2``).

    Deliberate differences: the ``WxH`` key itself is kept too (the webui drops it); an empty value
    is kept as "" (the webui drops the entry); and none of the webui's defaults for missing entries
    (``Clip skip: 1``, ``RNG: GPU``, ``Schedule type: Automatic``, the hires and inpaint fields),
    style extraction, hypernet prompt suffix or version back-compatibility fixes are applied, so
    params holds exactly what the text says.
    """
    *lines, last = text.strip().split("\n")
    entries = PARAM.findall(last)
    if len(entries) < 3:
        lines.append(last)
        entries = []
    prompt, negative, in_negative = [], [], False
    for ln in lines:
        ln = ln.strip()
        if ln.startswith("Negative prompt:"):
            in_negative = True
            ln = ln[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(ln)
    params = {}
    for key, value in entries:
        value = unquote(value)
        params[key] = value
        if size := IMAGE_SIZE.fullmatch(value):
            params[f"{key}-1"], params[f"{key}-2"] = size.groups()
    return "\n".join(prompt), "\n".join(negative), params


def unquote(value: str) -> str:
    """A JSON string's text; anything else (or broken JSON) as it is, like the webui's ``unquote``."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def next_sequence_number(folder: Path) -> int:
    """One past the highest leading number of the file names in ``folder`` (the webui's counter)."""
    best = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            head = name.split("-", 1)[0].split(".", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
    return best + 1


def _write_partial(image: Image.Image, folder: Path, parameters: str | None, extra: dict | None = None) -> str:
    """The PNG with its ``parameters`` text (and ``extra`` text chunks), in a temporary file in
    ``folder``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, text in {"parameters": parameters, **(extra or {})}.items():
        if text is not None:
            info.add_text(key, text)
    fd, tmp = tempfile.mkstemp(prefix=".sdrt-", suffix=".png.partial", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make the image private
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_png(image: Image.Image, folder: str | Path, seed: int | None, parameters: str | None,
             extra: dict | None = None) -> Path:
    """Write ``NNNNN-SEED.png`` (``NNNNN.png`` without a seed, as the webui's extras) atomically
    (temporary file, then a link that never overwrites); ``extra``: more text chunks."""
    folder = Path(folder)
    tmp = _write_partial(image, folder, parameters, extra)
    try:
        number = next_sequence_number(folder)
        while True:
            target = folder / (f"{number:05}.png" if seed is None else f"{number:05}-{seed}.png")
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)


def write_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write the PNG at ``path`` atomically (temporary file, then a rename that replaces ``path``)."""
    path = Path(path)
    tmp = _write_partial(image, path.parent, parameters)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
