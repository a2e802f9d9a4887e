"""The webui's prompt language: tables of prompts with the webui's results, chunking, CFG per step.

Expected values are what the webui's ``modules/prompt_parser.py`` returns (its doctests, and its
code run on the other rows: lark 1.1.2 as the webui pins it). One doctest of the webui is stale:
``a [{b|d{:.5] c`` does not parse there (``|`` stands outside an alternation), so the prompt is
used as it is; the row below has what the webui really returns.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.txt2img import GenerationParams
from sdrt.runtime.sampling.denoiser import CFGDenoiser
from sdrt.runtime.text.encoder import CondSchedule, MultiCond, make_chunks
from sdrt.runtime.text.prompt import parse_emphasis, parse_prompt, prompt_schedule, split_and

# -- emphasis (parse_prompt_attention) --

EMPHASIS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[a] [[b]] ((c))", [("a", 0.9090909090909091), (" ", 1.0), ("b", 0.8264462809917354), (" ", 1.0),
                         ("c", 1.2100000000000002)]),
    ("(a:1.5) (b: 0.5 ) (c:-1)", [("a", 1.5), (" ", 1.0), ("b", 0.5), (" ", 1.0), ("c", -1.0)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("a:1.2) b] c)", [("a:1.2) b] c)", 1.0)]),  # closers with nothing open are text
    ("[unclosed (both", [("unclosed ", 0.9090909090909091), ("both", 1.0)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 0.9090909090909091)]),  # crossing brackets
    ("\\\\ and \\ x and \\n", [("\\ and  x and n", 1.0)]),  # a lone backslash vanishes
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(x BREAK y)", [("x", 1.1), ("BREAK", -1.1), ("y", 1.1)]),  # weighted: the word BREAK, no break
    ("a BREAKb BREAK", [("a BREAKb", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("BREAK BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("", [("", 1.0)]),
    ("  ", [("  ", 1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("((a:2):3)", [("a", 6.0)]),
    ("[(a:2)]", [("a", 1.8181818181818181)]),
    ("a\\:b (c\\:d:1.5)", [("a:b ", 1.0), ("c:d", 1.5)]),
    ("(:1.5) x", [(" x", 1.0)]),
    ("(a:1.2.3", [("a:1.2.3", 1.1)]),
    ("x:\ny", [("x:\ny", 1.0)]),
]


@pytest.mark.parametrize("text, expected", EMPHASIS)
def test_emphasis_table(text, expected):
    got = parse_emphasis(text)
    assert got == expected  # weights bit for bit: the same products in the same order


def test_emphasis_bad_weight_is_one_line():
    with pytest.raises(SdrtError, match=r"^cannot read the emphasis weight '1\.2\.3' in the prompt$"):
        parse_emphasis("(a:1.2.3)")


# -- prompt editing and alternation (get_learned_conditioning_prompt_schedules) --

SCHEDULES = [
    # the webui's doctests, steps = 10
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", 10, [(10, "a [{b|d{:.5] c")]),  # the doctest is stale; this is what the webui returns
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", 10, [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", 10, [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    # the example at the top of prompt_parser.py, steps = 100
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
     "[ in background:0.25] [shoddy:masterful:0.5]", 100,
     [(25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
      (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
      (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
      (75, "fantasy landscape with a lake and an oak in background masterful"),
      (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
    # a dot makes a fraction of the steps, truncated after float arithmetic; no dot: a step number
    ("[a:b:0.29]", 100, [(28, "a"), (100, "b")]),
    ("[a:b:0.3]", 10, [(3, "a"), (10, "b")]),
    ("[a:b:0.7]", 10, [(7, "a"), (10, "b")]),
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),
    ("[a:b:2.5e-1]", 20, [(5, "a"), (20, "b")]),
    ("[a:b:1.]", 3, [(3, "a")]),
    ("[a:b:.5]", 4, [(2, "a"), (4, "b")]),
    ("[a:b:+2]", 5, [(2, "a"), (5, "b")]),
    ("[a:b:3]", 1, [(1, "a")]),  # past the steps: clamped
    ("[a:b:-3]", 3, [(3, "b")]),
    ("[a:b:0]", 3, [(3, "b")]),
    ("[a:b:0.0]", 3, [(3, "b")]),
    # [to:when], [from::when], spaces
    ("[:b:1]", 3, [(1, ""), (3, "b")]),
    ("[a::1]", 3, [(1, "a"), (3, "")]),
    ("[a:1]", 3, [(1, ""), (3, "a")]),
    ("[ a : b : 2 ]", 5, [(2, " a "), (5, " b ")]),
    ("[a:b:2 ]", 5, [(2, "a"), (5, "b")]),
    ("a\nb [c:d:\n1\n]", 3, [(1, "a\nb c"), (3, "a\nb d")]),
    # emphasis inside edits stays for the emphasis parser
    ("[(a:1.2):b:2]", 5, [(2, "(a:1.2)"), (5, "b")]),
    ("[a:(b):2]", 5, [(2, "a"), (5, "(b)")]),
    ("[red:blue:0.5](hair:1.2)", 10, [(5, "red(hair:1.2)"), (10, "blue(hair:1.2)")]),
    ("[a:b:2](c)[d|e]", 4, [(1, "a(c)d"), (2, "a(c)e"), (3, "b(c)d"), (4, "b(c)e")]),
    # alternation
    ("[a|b|c]", 5, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),
    ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[[a|b]:c:3]", 5, [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "c")]),
    # what does not parse is used as it is
    ("a [b:c:2", 10, [(10, "a [b:c:2")]),
    ("[a|b", 10, [(10, "[a|b")]),
    ("(a|b)", 5, [(5, "(a|b)")]),
    ("a | b [c:2]", 5, [(5, "a | b [c:2]")]),
    ("[c:2] a\\", 5, [(5, "[c:2] a\\")]),  # a backslash that escapes nothing
    ("[a:b:c]", 3, [(3, "[a:b:c]")]),
    ("a\\[b:2]", 10, [(10, "a\\[b:2]")]),
    ("\\[a:b:2\\]", 10, [(10, "\\[a:b:2\\]")]),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULES)
def test_schedule_table(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


# -- AND (get_multicond_prompt_list) --

AND = [
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a:0.5 AND b :2", [("a", 0.5), (" b", 2.0)]),
    ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a ANDb AND c", [("a ANDb", 1.0), (" c", 1.0)]),
    ("a and b", [("a and b", 1.0)]),
    ("x:1.5.", [("x:1.5.", 1.0)]),
    ("cat :  -.5  ", [("cat", -0.5)]),
    ("[a:b:0.5]", [("[a:b:0.5]", 1.0)]),
    ("x AND y:", [("x", 1.0), (" y:", 1.0)]),
    ("z:1\n", [("z", 1.0)]),
    (" a AND  b ", [(" a", 1.0), ("  b", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", AND)
def test_and_table(prompt, expected):
    assert split_and(prompt) == expected


def test_parse_prompt_combines_and_with_schedules():
    parts = parse_prompt("a [b:c:2] AND d:0.5", 4)
    assert [(p.text, p.weight, p.schedule) for p in parts] == [
        ("a [b:c:2]", 1.0, ((2, "a b"), (4, "a c"))), (" d", 0.5, ((4, " d"),))]


def _hostile(n):
    return ["(" * n, "[" * n, "(" * (n // 2) + "a" + ")" * (n // 2), "[" * (n // 2) + "a" + "]" * (n // 2),
            "[a:" * (n // 5) + "b" + ":1]" * (n // 5), "[a|b]" * (n // 5), "(a:1.1)" * (n // 7), " " * n + "x",
            "a AND " * (n // 6), "\\(" * (n // 2)]


def _parse_time(text):
    """Best of three wall times of all three parsers on ``text`` (the minimum filters out load)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        parse_emphasis(text)
        prompt_schedule(text, 20)
        split_and(text)
        best = min(best, time.perf_counter() - start)
    return best


def test_parsers_are_linear_on_hostile_prompts():
    """Ten times the text takes about ten times as long (a quadratic parser: a hundred times).
    Judged by the growth ratio, measured in this run, not by a wall-clock limit."""
    for small, large in zip(_hostile(2_000), _hostile(20_000)):
        ratio = _parse_time(large) / max(_parse_time(small), 1e-4)
        assert ratio < 35, (large[:20], ratio)


# -- chunks (tokenize_line) --

BOS, EOS, COMMA = 49406, 49407, 267


def chunk_lists(pieces, **kw):
    chunks = make_chunks(pieces, bos=BOS, eos=EOS, comma=COMMA, **kw)
    for c in chunks:
        assert len(c.tokens) == len(c.multipliers) == 77 and c.tokens[0] == BOS and c.tokens[-1] == EOS
    return [[t for t in c.tokens[1:-1] if t != EOS] for c in chunks], chunks


def words(n, start=1000):
    return list(range(start, start + n))


@pytest.mark.parametrize("pieces, lengths", [
    ([], [0]),  # an empty prompt is one chunk
    ([(words(75), 1.0)], [75]),
    ([(words(76), 1.0)], [75, 1]),
    ([(words(150), 1.0)], [75, 75]),
    ([(words(151), 1.0)], [75, 75, 1]),
    # a comma within the last 20 tokens of a full chunk: what follows it moves on
    ([(words(60) + [COMMA] + words(20), 1.0)], [61, 20]),
    ([(words(55) + [COMMA] + words(25), 1.0)], [56, 25]),  # the comma 20 back: still moves
    ([(words(54) + [COMMA] + words(25), 1.0)], [75, 5]),  # 21 back: does not
    ([(words(75) + [COMMA] + words(3), 1.0)], [75, 4]),  # the 76th token a comma: it starts chunk 2
    ([(words(10), 1.0), (None, -1.0), (words(5), 1.0)], [10, 5]),  # BREAK
    ([(words(3), 1.0), (None, -1.0), (None, -1.0), (words(2), 1.0)], [3, 0, 2]),  # BREAK BREAK: an empty chunk
    ([(None, -1.0)], [0]),  # BREAK alone
    ([(words(75), 1.0), (None, -1.0)], [75]),
])
def test_chunk_table(pieces, lengths):
    got, _ = chunk_lists(pieces)
    assert [len(c) for c in got] == lengths


def test_chunks_keep_order_and_weights():
    pieces = [(words(50), 1.0), (words(20, 2000) + [COMMA], 1.5), (words(10, 3000), 0.5)]
    got, chunks = chunk_lists(pieces)
    flat = [t for c in got for t in c]
    assert flat == words(50) + words(20, 2000) + [COMMA] + words(10, 3000)
    # the chunk fills at the 4th word of weight 0.5, 5 after the comma: those move on
    assert [len(c) for c in got] == [71, 10]
    assert chunks[0].multipliers == [1.0] * 51 + [1.5] * 21 + [1.0] * 5
    assert chunks[1].multipliers == [1.0] + [0.5] * 10 + [1.0] * 66


class FakeEmbedding:
    def __init__(self, name, n):
        self.name, self.vectors = name, np.zeros((n, 4), np.float32)


class FakeLibrary:
    """Embedding names as token runs: 900 -> 'emb3' (3 vectors), 901 902 -> 'emb2' (2 vectors)."""

    def __init__(self):
        self.e3, self.e2 = FakeEmbedding("emb3", 3), FakeEmbedding("emb2", 2)

    def find(self, tokens, i):
        if tokens[i] == 900:
            return self.e3, 1
        if tokens[i:i + 2] == [901, 902]:
            return self.e2, 2
        return None


def test_embeddings_take_their_vectors_places_and_weights():
    lib = FakeLibrary()
    (chunk,) = make_chunks([(words(2) + [900, 901, 902] + words(1, 1002), 1.2)], bos=BOS, eos=EOS, comma=COMMA,
                           embeddings=lib)
    assert chunk.tokens[1:9] == [1000, 1001, 0, 0, 0, 0, 0, 1002]
    assert chunk.fixes == [(2, lib.e3), (5, lib.e2)]
    assert chunk.multipliers[1:9] == [1.2] * 8


def test_an_embedding_that_does_not_fit_starts_the_next_chunk():
    lib = FakeLibrary()
    chunks = make_chunks([(words(73) + [900] + words(1, 2000), 1.0)], bos=BOS, eos=EOS, comma=COMMA, embeddings=lib)
    assert len(chunks) == 2
    assert chunks[0].tokens[74:] == [EOS, EOS, EOS] and chunks[0].fixes == []
    assert chunks[1].tokens[1:5] == [0, 0, 0, 2000] and chunks[1].fixes == [(0, lib.e3)]


def test_comma_backtrack_moves_embeddings_with_their_tokens():
    lib = FakeLibrary()
    chunks = make_chunks([(words(65) + [COMMA] + words(5, 2000) + [900] + words(5, 3000), 1.0)], bos=BOS, eos=EOS,
                         comma=COMMA, embeddings=lib)
    assert [c.fixes for c in chunks] == [[], [(5, lib.e3)]]
    assert chunks[1].tokens[1:14] == words(5, 2000) + [0, 0, 0] + words(5, 3000)


# -- CFG: AND parts, schedules per call, row layout --


class RecordingModel:
    """model(x, sigma, context) -> a value per row that shows which context it saw."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context):
        self.calls.append((x.shape[0], context.shape[1], context[:, 0, 0].tolist()))
        return x * 0 + context[:, 0, 0].reshape(-1, *([1] * (x.ndim - 1)))


def constant(value, tokens=77, width=4):
    return np.full((tokens, width), value, np.float32)


def test_cfg_combines_and_parts_as_the_webui():
    cond = MultiCond(((CondSchedule((10,), (constant(2.0),)), 1.0), (CondSchedule((10,), (constant(5.0),)), -0.5)))
    uncond = CondSchedule((10,), (constant(1.0),))
    model = RecordingModel()
    x = np.zeros((2, 1, 2, 2), np.float32)
    out = CFGDenoiser(model, cond, uncond, 7.0)(x, 3.0)
    # rows: image 0 part 0, image 0 part 1, image 1 part 0, image 1 part 1, uncond 0, uncond 1
    assert model.calls == [(6, 77, [2.0, 5.0, 2.0, 5.0, 1.0, 1.0])]
    expected = 1.0 + (2.0 - 1.0) * 7.0 + (5.0 - 1.0) * (-0.5 * 7.0)
    assert np.allclose(out, expected)


def test_cfg_schedules_follow_the_call_counter():
    # The webui's reconstruct_cond_batch: the first entry whose end >= the number of calls so far
    cond = MultiCond(((CondSchedule((2, 4), (constant(1.0), constant(2.0))), 1.0),))
    uncond = CondSchedule((1, 4), (constant(10.0), constant(20.0)))
    model = RecordingModel()
    den = CFGDenoiser(model, cond, uncond, 2.0)
    for _ in range(6):
        den(np.zeros((1, 1, 1, 1), np.float32), 1.0)
    seen = [c[2] for c in model.calls]
    assert seen == [[1.0, 10.0], [1.0, 10.0], [1.0, 20.0], [2.0, 20.0], [2.0, 20.0],
                    [1.0, 10.0]]  # call 5 is past every end: the webui falls back to the first entry


def test_cfg_with_different_lengths_runs_twice():
    cond = MultiCond(((CondSchedule((5,), (constant(2.0, 154),)), 1.0),))
    model = RecordingModel()
    out = CFGDenoiser(model, cond, CondSchedule((5,), (constant(1.0),)), 3.0)(np.zeros((1, 1, 1, 1), np.float32), 1.0)
    assert model.calls == [(1, 154, [2.0]), (1, 77, [1.0])]
    assert np.allclose(out, 1.0 + (2.0 - 1.0) * 3.0)


def test_cfg_scale_one_skips_uncond_only_for_a_single_plain_part():
    model = RecordingModel()
    single = MultiCond(((CondSchedule((5,), (constant(2.0),)), 1.0),))
    uncond = CondSchedule((5,), (constant(1.0),))
    assert np.allclose(CFGDenoiser(model, single, uncond, 1.0)(np.zeros((1, 1, 1, 1), np.float32), 1.0), 2.0)
    assert model.calls == [(1, 77, [2.0])]
    weighted = MultiCond(((CondSchedule((5,), (constant(2.0),)), 0.5),))
    assert np.allclose(CFGDenoiser(model, weighted, uncond, 1.0)(np.zeros((1, 1, 1, 1), np.float32), 1.0), 1.5)


def test_cfg_takes_plain_arrays():
    model = RecordingModel()
    out = CFGDenoiser(model, constant(3.0)[None], constant(1.0)[None], 2.0)(np.zeros((2, 1, 1, 1), np.float32), 1.0)
    assert model.calls == [(4, 77, [3.0, 3.0, 1.0, 1.0])] and np.allclose(out, 5.0)


# -- through the tiny model --


@pytest.fixture(scope="module")
def prompt_pipeline(tiny_bundle):
    from sdrt.runtime.pipeline.txt2img import Pipeline

    return Pipeline(tiny_bundle)


def test_emphasis_scales_then_restores_the_mean_per_chunk(prompt_pipeline):
    te = prompt_pipeline.text_encoder
    long_text = ", ".join(["a small red circle"] * 20)  # 2 chunks
    plain = te.encode([long_text])[0]
    weighted = te.encode([long_text + ", (blue square:1.5)"])[0]
    raw = te.encode([long_text + ", blue square"])[0]
    chunks = te.chunks(long_text + ", (blue square:1.5)")
    assert len(chunks) == 2
    # chunk 1 has no emphasis: untouched; chunk 2: scaled by the weights, then its own mean restored
    assert np.array_equal(weighted[:77], plain[:77])
    m = np.array(chunks[1].multipliers, np.float32)[:, None]
    z = raw[77:]
    expected = z * m * np.float32(z.astype(np.float64).mean() / (z * m).astype(np.float64).mean())
    assert np.allclose(weighted[77:], expected, rtol=1e-5, atol=1e-6)


def test_a_schedule_restores_one_mean_over_its_texts(prompt_pipeline):
    te = prompt_pipeline.text_encoder
    texts = ["a (red:1.5) circle", "a blue circle", "a blue circle"]
    together = te.encode(texts)
    raw = te.encode(["a red circle", "a blue circle", "a blue circle"])
    m = np.array([c.multipliers for t in texts for c in te.chunks(t)], np.float32)[..., None]
    ratio = raw.astype(np.float64).mean() / (raw * m).astype(np.float64).mean()
    assert np.allclose(together, raw * m * np.float32(ratio), rtol=1e-5, atol=1e-6)
    assert not np.allclose(together[1], raw[1])  # the unweighted text is rescaled too, as in the webui
    schedule = te.schedule(prompt_schedule("a [(red:1.5):blue:1] circle", 3))
    assert schedule.ends == (1, 3)
    assert np.array_equal(np.stack(schedule.conds), te.encode(["a (red:1.5) circle", "a blue circle"]))


def test_pipeline_conditioning_shapes_and_padding(prompt_pipeline):
    long_prompt = ", ".join(["a small red circle on a blue background"] * 12)
    cond, uncond = prompt_pipeline.conditioning(GenerationParams(long_prompt, negative_prompt="ugly"))
    assert cond.tokens == uncond.tokens == 154 and uncond.padded and not cond.padded
    empty = prompt_pipeline.text_encoder.encode([""])[0]
    assert np.array_equal(uncond.at(0)[77:], empty)  # padded with the encoded empty prompt
    cond, uncond = prompt_pipeline.conditioning(GenerationParams(long_prompt, negative_prompt="ugly", pad_conds=False))
    assert (cond.tokens, uncond.tokens) == (154, 77)
    # AND parts: the shorter repeats its last vector
    cond, _ = prompt_pipeline.conditioning(GenerationParams(long_prompt + " AND a cat:0.5"))
    (long_part, w1), (short_part, w2) = cond.parts
    assert (w1, w2) == (1.0, 0.5) and short_part.tokens == 154
    assert np.array_equal(short_part.at(0)[77:], np.repeat(short_part.at(0)[76:77], 77, axis=0))


@pytest.mark.parametrize("sampler, total", [("Euler", 6), ("Heun", 12)])
def test_second_order_samplers_get_schedules_over_twice_the_steps(prompt_pipeline, sampler, total):
    from sdrt.runtime import sampling

    try:
        sampling.resolve(sampler)
    except SdrtError:
        pytest.skip(f"no {sampler} sampler")
    p = GenerationParams("a [red:blue:0.5] circle", steps=6, sampler_name=sampler)
    cond, uncond = prompt_pipeline.conditioning(p)
    assert cond.parts[0][0].ends == (total // 2, total) and uncond.ends == (total,)


def test_distinct_texts_are_encoded_once(prompt_pipeline, monkeypatch):
    te = prompt_pipeline.text_encoder
    rows = []
    original = te.encode_tokens
    monkeypatch.setattr(te, "encode_tokens", lambda ids, *a, **k: rows.append(len(ids)) or original(ids, *a, **k))
    cond, uncond = te.conditioning("[cat|dog] AND[cat|dog]:0.5", "", 20)
    # two distinct texts for the prompt (20 schedule entries), one for the negative prompt
    assert sorted(rows) == [1, 2] and len(cond.parts[0][0].ends) == 20


def test_infotext_carries_pad_conds(prompt_pipeline):
    long_prompt = ", ".join(["a small red circle on a blue background"] * 12)
    (r,) = prompt_pipeline.generate(GenerationParams(long_prompt, negative_prompt="ugly", steps=1,
                                                     sampler_name="Euler", seed=1))
    assert re.search(r", RNG: CPU, Pad conds: True, Version: ", r.infotext)
    (r,) = prompt_pipeline.generate(GenerationParams("a cat", steps=1, sampler_name="Euler", seed=1))
    assert "Pad conds" not in r.infotext and "TI hashes" not in r.infotext


@pytest.mark.parametrize("prompt, message", [
    ("BREAK " * 3000, r"^the prompt needs 3000 chunks of 75 tokens; sdrt takes at most 128$"),
    ("a AND " * 40, r"^the prompt has 41 AND parts; sdrt takes at most 32$"),
    ("(a:" + "9" * 400 + ")", r"^the prompt's emphasis weights make the conditioning infinite or NaN$"),
])
def test_absurd_prompts_are_refused_with_one_line(prompt_pipeline, prompt, message):
    start = time.perf_counter()
    with pytest.raises(SdrtError, match=message):
        prompt_pipeline.conditioning(GenerationParams(prompt))
    assert time.perf_counter() - start < 10
