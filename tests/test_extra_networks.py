"""Extra-network tags (``<lora:name:0.8>``): parsed and cut out of the prompt as the webui's
``modules/extra_networks.py`` does; unknown types warned about (LoRA and hypernetwork tags are
applied by the pipeline: tests/test_networks.py, tests/test_hypernetworks.py)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.txt2img import GenerationParams
from sdrt.runtime.text.encoder import strip_extra_networks
from sdrt.runtime.text.extra_networks import ExtraNetwork, parse_prompt
from sdrt.runtime.text.tokenizer import BOS_TOKEN, BOS_TOKEN_ID, EOS_TOKEN, EOS_TOKEN_ID, ClipTokenizer

# (prompt, text left for CLIP, [(type, items), ...]): what the webui's parse_prompt returns
PARSE = [
    ("a cat <lora:catstyle:0.8>", "a cat ", [("lora", ("catstyle", "0.8"))]),
    ("<lora:a:1>, <lora:b:0.5>, <hypernet:h:0.3> x", ", ,  x",
     [("lora", ("a", "1")), ("lora", ("b", "0.5")), ("hypernet", ("h", "0.3"))]),
    ("<lora:name>", "", [("lora", ("name",))]),
    ("<lyco:l:te=0.8:unet=0.6>", "", [("lyco", ("l", "te=0.8", "unet=0.6"))]),
    ("<lora:my lora (v2):0.7>", "", [("lora", ("my lora (v2)", "0.7"))]),  # anything but ">" in the args
    ("<lora:a::0.5:>", "", [("lora", ("a", "", "0.5", ""))]),
    # unknown types are cut out too (the webui then skips them)
    ("a <foo:bar> b", "a  b", [("foo", ("bar",))]),
    ("<my_net2:x>", "", [("my_net2", ("x",))]),
    # inside prompt editing, alternation, emphasis, AND: cut out before any of them is parsed
    ("a [<lora:x:1>:b:0.5]", "a [:b:0.5]", [("lora", ("x", "1"))]),
    ("[cat|<lora:x:1>dog]", "[cat|dog]", [("lora", ("x", "1"))]),
    ("(<lora:x:1>:1.2) AND b <lora:y:0.2>:0.5", "(:1.2) AND b :0.5", [("lora", ("x", "1")), ("lora", ("y", "0.2"))]),
    ("\\<lora:x:1>", "\\", [("lora", ("x", "1"))]),
    ("a <lora:x\n:1> b", "a  b", [("lora", ("x\n", "1"))]),
    # not tags: no colon, empty type or args, a type that is not one word, no closing ">"
    ("<lora> <lora:> <:x> <lo ra:x> <lora:x:0.8 a > b", "<lora> <lora:> <:x> <lo ra:x>  b",
     [("lora", ("x", "0.8 a "))]),
    ("<lora:x:0.8", "<lora:x:0.8", []),
    ("a > b < c", "a > b < c", []),
    ("<<lora:x:1>>", "<>", [("lora", ("x", "1"))]),
    ("<lora:<lora:x:1>", "", [("lora", ("<lora", "x", "1"))]),
    ("", "", []),
]


@pytest.mark.parametrize("prompt, text, expected", PARSE)
def test_parse_table(prompt, text, expected):
    got_text, networks = parse_prompt(prompt)
    assert got_text == text
    assert [(n.type, n.items) for n in networks] == expected


def test_positional_and_named_args():
    (n,) = parse_prompt("<lora:name:0.8:unet=0.6:te=0.9:a=b=c:=x>")[1]
    assert n.name == "name" and n.known
    # one "=" names an argument; others (none, or two) are positional, as ExtraNetworkParams
    assert n.positional == ("name", "0.8", "a=b=c")
    assert n.named == {"unet": "0.6", "te": "0.9", "": "x"}
    assert n.tag == "<lora:name:0.8:unet=0.6:te=0.9:a=b=c:=x>"
    assert not ExtraNetwork("foo", ("bar",)).known


@pytest.mark.parametrize("tag, multipliers", [
    ("<lora:x>", (1.0, 1.0)),
    ("<lora:x:0.8>", (0.8, 0.8)),
    ("<lora:x:0.8:0.3>", (0.8, 0.3)),
    ("<lora:x:0.8:te=0.5>", (0.5, 0.5)),  # the UNet's defaults to the text encoder's, named or not
    ("<lora:x:te=0.5:unet=-1.5>", (0.5, -1.5)),
    ("<lora:x:1:2:unet=0.25>", (1.0, 0.25)),
    ("<hypernet:h:0.4>", (0.4, 0.4)),
])
def test_multipliers(tag, multipliers):
    (n,) = parse_prompt(tag)[1]
    assert n.multipliers() == multipliers


def test_a_multiplier_that_is_no_number_is_a_one_line_error():
    (n,) = parse_prompt("<lora:x:strong>")[1]
    with pytest.raises(SdrtError, match=r"'strong' of <lora:x:strong>"):
        n.multipliers()


def _parse_time(text: str) -> float:
    """Best of three wall times of ``parse_prompt`` (the minimum filters out load)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        parse_prompt(text)
        best = min(best, time.perf_counter() - start)
    return best


def test_parse_is_linear_in_the_prompt_length():
    """Ten times the text takes about ten times as long (a quadratic parser: a hundred times).
    Judged by the growth ratio, measured in this run, not by a wall-clock limit."""
    for make in (lambda n: "<a:" * n, lambda n: "<a:x " * n + ">", lambda n: "<lora:x:1>" * n):
        ratio = _parse_time(make(50_000)) / max(_parse_time(make(5_000)), 1e-4)
        assert ratio < 35, (make(1), ratio)


def test_warnings_name_the_networks(caplog):
    with caplog.at_level(logging.WARNING):
        assert strip_extra_networks("a <lora:x:0.8> <hypernet:h> <foo:bar>", "ugly <lora:neg:1>") == "a   "
    positive, negative = [r.getMessage() for r in caplog.records]
    # LoRA and hypernetwork tags are applied by the pipeline (tests/test_networks.py,
    # tests/test_hypernetworks.py): not named as skipped
    assert "not applied" in positive and "unknown types" in positive and positive.endswith(": <foo:bar>")
    assert "lora" not in positive and "hypernet" not in positive
    assert "negative prompt" in negative and "encoded as text" in negative and "<lora:neg:1>" in negative
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert strip_extra_networks("a (cat:1.2), [dog|fox]", "ugly") == "a (cat:1.2), [dog|fox]"
    assert not caplog.records


def test_token_id_constants_are_the_vocabulary_s():
    tok = ClipTokenizer.default()
    assert (tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)) == (BOS_TOKEN_ID, EOS_TOKEN_ID)


# -- end to end, on the tiny model --

def _same(a, b):
    """Two (MultiCond, CondSchedule) pairs hold the same arrays, entry by entry."""
    (cond_a, uncond_a), (cond_b, uncond_b) = a, b
    assert [w for _, w in cond_a.parts] == [w for _, w in cond_b.parts]
    for (sa, _), (sb, _) in zip(cond_a.parts, cond_b.parts):
        assert sa.ends == sb.ends and all(np.array_equal(x, y) for x, y in zip(sa.conds, sb.conds))
    assert uncond_a.ends == uncond_b.ends
    assert all(np.array_equal(x, y) for x, y in zip(uncond_a.conds, uncond_b.conds))


@pytest.mark.parametrize("tagged, plain", [
    ("a red circle <lora:x:0.8>", "a red circle"),
    ("<lora:x:0.8>a (red:1.3) circle, <hypernet:h:te=0.5> [on a:in the:3] mat <foo:bar>",
     "a (red:1.3) circle, [on a:in the:3] mat"),
    ("a [red:<lora:x:1>blue:0.5] circle AND <lyco:y:0.5>a square:0.7", "a [red:blue:0.5] circle AND a square:0.7"),
])
def test_tagged_prompt_gives_the_conditioning_of_the_prompt_without_tags(tiny_pipeline, caplog, tagged, plain):
    te = tiny_pipeline.text_encoder
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.text.encoder"):
        got = te.conditioning(tagged, "blurry, ugly", 8)
    # LoRA and hypernetwork tags are the pipeline's to apply; unknown types are named as skipped
    assert all(r.levelno == logging.WARNING and "<lora:" not in r.getMessage() and "<hypernet:" not in r.getMessage()
               for r in caplog.records)
    assert bool(caplog.records) == ("<foo:" in tagged)
    _same(got, te.conditioning(plain, "blurry, ugly", 8))


def test_tags_in_the_negative_prompt_are_text_as_in_the_webui(tiny_pipeline, caplog):
    te = tiny_pipeline.text_encoder
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.text.encoder"):
        _, uncond = te.conditioning("a cat", "ugly <lora:bad:1>", 4)
    (record,) = caplog.records
    assert "negative prompt" in record.getMessage() and "<lora:bad:1>" in record.getMessage()
    assert np.array_equal(uncond.at(0), te.encode(["ugly <lora:bad:1>"])[0])
    assert not np.array_equal(uncond.at(0), te.encode(["ugly "])[0])


def test_generation_with_a_tag_matches_without_and_the_infotext_keeps_it(tiny_pipeline, caplog):
    p = GenerationParams("a red circle <foo:x:0.8>", negative_prompt="ugly", steps=2, seed=3, width=64,
                         height=64)
    with caplog.at_level(logging.WARNING):
        (tagged,) = tiny_pipeline.generate(p)
    assert any("<foo:x:0.8>" in r.getMessage() for r in caplog.records)
    (plain,) = tiny_pipeline.generate(GenerationParams(**{**p.__dict__, "prompt": "a red circle"}))
    assert np.array_equal(np.asarray(tagged.image), np.asarray(plain.image))
    assert tagged.infotext.startswith("a red circle <foo:x:0.8>\nNegative prompt: ugly\n")
    # a LoRA or hypernetwork the folders lack is one clear error (tests/test_networks.py and
    # tests/test_hypernetworks.py apply real ones)
    with pytest.raises(SdrtError, match=r"no LoRA named 'x'"):
        tiny_pipeline.generate(GenerationParams(**{**p.__dict__, "prompt": "a red circle <lora:x:0.8>"}))
    with pytest.raises(SdrtError, match=r"no hypernetwork named 'x' in models/hypernetworks"):
        tiny_pipeline.generate(GenerationParams(**{**p.__dict__, "prompt": "a red circle <hypernet:x:0.8>"}))
