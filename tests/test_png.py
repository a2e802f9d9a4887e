"""The webui's PNG ``parameters`` text: quoting, writing, and reading back by its parser's rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from sdrt.runtime.png import infotext, parse_infotext, quote, save_png, write_png

CORPUS = Path(__file__).parent / "data" / "infotexts"


@pytest.mark.parametrize("name", sorted(p.stem for p in CORPUS.glob("*.txt")))
def test_corpus(name):
    """Hand-written infotexts in the webui's format, each beside its expected parse."""
    expected = json.loads((CORPUS / f"{name}.json").read_text(encoding="utf-8"))
    prompt, negative, params = parse_infotext((CORPUS / f"{name}.txt").read_text(encoding="utf-8"))
    assert (prompt, negative, params) == (expected["prompt"], expected["negative"], expected["params"])


def test_corpus_is_complete():
    texts = {p.stem for p in CORPUS.glob("*.txt")}
    assert texts == {p.stem for p in CORPUS.glob("*.json")} and len(texts) >= 12


@pytest.mark.parametrize("value, written", [
    ("Euler a", "Euler a"),
    (7, "7"),
    ("a, b", '"a, b"'),
    ("emb: 0123456789ab", '"emb: 0123456789ab"'),
    ("C:", '"C:"'),
    ("two\nlines", '"two\\nlines"'),
    ('say "hi"', '"say \\"hi\\""'),  # sdrt only: the webui writes this one bare
    ("naïve", "naïve"),
    ("naïve, café", '"naïve, café"'),  # not \u-escaped, as the webui's ensure_ascii=False
])
def test_quote(value, written):
    assert quote(value) == written


def test_infotext_layout():
    params = {"Steps": 20, "Sampler": "Euler a", "Seed": 1, "Clip skip": None, "Lora hashes": "a: 1, b: 2"}
    assert infotext("a cat", "", params) == 'a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Lora hashes: "a: 1, b: 2"'
    assert infotext("a cat", "ugly", params).splitlines()[1] == "Negative prompt: ugly"


SDRT_PARAMS = {  # the shape of Pipeline.infotext_params, with values that need quoting
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": 123,
    "Size": "512x768", "Model hash": "6ce0161689", "Model": 'my "model", v2: final',
    "Clip skip": 2, "RNG": "CPU", "TI hashes": "emb: 0123456789ab, neg-emb/x: ba9876543210",
    "Hires prompt": "line one\nline two", "Odd": '"quoted"', "Pad conds": True, "Version": "sdrt 0.1.0",
}


@pytest.mark.parametrize("prompt, negative", [
    ("a cat", ""),
    ("a cat: cute", "ugly"),
    ("style: anime, mood: happy, colors: vivid", "text: watermark, a: b, c: d"),
    ("first line\nsecond line: with colon\nSteps: 1, Sampler: Euler, Seed: 2", "neg one\nneg: two, x: y, z: w"),
    ('(red hair:1.2), [blue:green:0.5], "quoted", <lora:x:0.8>, BREAK a\\b', "(worst quality:1.4)"),
    ("", "only a negative"),
    ("", ""),
    ("ünïcødé, 日本語: テスト", "ÿ"),
])
def test_round_trip(prompt, negative):
    """What sdrt writes reads back to the same prompt, negative prompt and params."""
    got_prompt, got_negative, got = parse_infotext(infotext(prompt, negative, SDRT_PARAMS))
    assert (got_prompt, got_negative) == (prompt, negative)
    assert got == {**{k: str(v) for k, v in SDRT_PARAMS.items()}, "Size-1": "512", "Size-2": "768"}


def test_last_line_needs_three_entries():
    assert parse_infotext("a cat\nSteps: 20, Seed: 1") == ("a cat\nSteps: 20, Seed: 1", "", {})
    assert parse_infotext("a cat\nSteps: 20, Seed: 1, CFG scale: 7") == ("a cat", "", {
        "Steps": "20", "Seed": "1", "CFG scale": "7"})
    # a key has two or more characters, so "(a:1.1)" attention weights do not count; "(red hair:1.1)" does
    assert parse_infotext("x\n(a:1.1), (b:1.2), (c:1.3)")[2] == {}
    assert parse_infotext("(red hair:1.1), (blue eyes:1.2), (tall:0.9)")[2] == {
        "red hair": "1.1)", "blue eyes": "1.2)", "tall": "0.9)"}


def test_values_are_not_stripped():
    """Like the webui, an unquoted value runs to the comma, spaces included; a bare key is skipped."""
    _, _, params = parse_infotext("x\nSteps: 20 , Model:  my model  , Tiling, Seed: 1, Tile: 64x64 px")
    assert params == {"Steps": "20 ", "Model": "my model  ", "Seed": "1", "Tile": "64x64 px"}  # not split: not WxH


def test_parse_keeps_unparsable_quotes():
    """A value that is not valid JSON stays as written, as the webui's unquote leaves it."""
    _, _, params = parse_infotext('x\nSteps: 20, Model: "a\\qb", Seed: 1, Bad: "')
    assert params == {"Steps": "20", "Model": '"a\\qb"', "Seed": "1", "Bad": '"'}


def test_save_png_carries_the_text(tmp_path):
    text = infotext("a cat: cute\nsecond", "ugly", SDRT_PARAMS)
    path = save_png(Image.new("RGB", (8, 8)), tmp_path, 123, text)
    assert path.name == "00000-123.png"
    with Image.open(path) as image:
        assert parse_infotext(image.text["parameters"]) == parse_infotext(text)
        assert parse_infotext(image.text["parameters"])[0] == "a cat: cute\nsecond"


def test_save_png_numbers_after_the_highest(tmp_path):
    (tmp_path / "00007-99.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    first = save_png(Image.new("RGB", (8, 8)), tmp_path, 5, "a")
    second = save_png(Image.new("RGB", (8, 8)), tmp_path, 6, "b")
    assert (first.name, second.name) == ("00008-5.png", "00009-6.png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sdrt-")]  # no partial file left


def test_write_png_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "out.png"
    assert write_png(Image.new("RGB", (8, 8)), path, "first") == path
    write_png(Image.new("RGB", (4, 4)), path, "second")
    with Image.open(path) as image:
        assert image.size == (4, 4) and image.text["parameters"] == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]
