"""sdrt.runtime.text.tokenizer: CLIP BPE ids as the webui gets them.

References: transformers' fast CLIPTokenizer (transformers 5 has no slow one); a re-statement of
the slow one (transformers 4.x ``CLIPTokenizer`` with ftfy) and of open_clip's ``SimpleTokenizer``
below, needing ftfy and regex; golden ids taken from the real transformers 4.57.3 slow tokenizer
with ftfy 6.3.1; and, opt-in, the real thing: set SDRT_SLOW_CLIP_PYTHONPATH to a folder holding
transformers 4.x (``pip install --no-deps --target DIR "transformers<5" "huggingface_hub<1"
"tokenizers<0.23"``) to compare with its slow CLIPTokenizer.
"""

import gzip
import html
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.text.tokenizer import _DATA_DIR, ClipTokenizer

REPO = Path(__file__).resolve().parents[1]

PROMPT_75 = ("masterpiece, best quality, ultra-detailed, 8k wallpaper, (1girl:1.2), solo, long silver hair, "
             "blue eyes, looking at viewer, smile, school uniform, cherry blossoms, outdoors, sunlight, depth of "
             "field, bokeh, [sketch], cinematic lighting, vibrant colors, intricate details, sharp focus, film grain, "
             "soft shadows, hdr")

# Text on which transformers' fast tokenizer, the slow one and ours all agree.
PLAIN = [
    "", " ", "a", "masterpiece, best quality, (red:1.2) circle", "a photo of an astronaut riding a horse on mars",
    "(masterpiece:1.2), [blurry], ((best quality)), {extra}, 1girl, solo, long_hair, looking_at_viewer",
    "BREAK AND <lora:add_detail:1> embedding:bad-hands-5 [from:to:0.5] [a|b]", PROMPT_75,
    "Hello, World!!! It's 3.14159 o'clock; isn't 42?", "don't won't I'm we'll they've she'd it's DON'T SHE'S a'S",
    "1234567890 12,345.67 1e-5 -3 +4 50% $5 #tag @user", "café naïve résumé Ångström crème brûlée",
    "Cafe\u0301 decomposed", "straße STRASSE ẞ İstanbul ı I", "日本語のテキスト、東京タワー。", "中文字符测试 你好, 世界!",
    "한국어 텍스트", "Привет мир", "مرحبا بالعالم", "नमस्ते दुनिया", "ภาษาไทย", "emoji 😀🎉❤️👍🏽 👨‍👩‍👧 🇯🇵 ✔ 🏳️‍🌈",
    "tab\there", "new\nline\r\nwin\rmac", "multi    spaces   ", "\u00a0nbsp\u00a0here\u00a0",
    "thin\u2009space\u202fnarrow\u2028sep\u2029para", "zero\u200bwidth\u200cjoin\u200dx\u2060y",
    "supercalifragilisticexpialidocious" * 3, "a" * 300, "x" * 1000 + "y", "!!!!!!!!!!!!!!!!!!!!??????....,,,,;;;;::::",
    "snake_case kebab-case camelCase", "http://example.com/path?q=1&r=2#frag", "C:\\path\\file.txt",
    "  leading and trailing  ", "\t\n\r\x0c", "math: 2×3=6, √2, ∞, π≈3.14, ½ ² ™ © ① Ⅻ ㍻ ℌ𝔢𝔩𝔩𝔬 𝐛𝐨𝐥𝐝",
    "<|startoftext|>hello<|endoftext|>", "a <|endoftext|> b", "<|endoftext|><|endoftext|>", "<|endoftext", "'''s '' a&b",
    "<|ENDOFTEXT|> <|EndOfText|>",
]

# Text that ftfy (slow tokenizer, webui) cleans up and transformers' fast tokenizer does not, or
# that the fast tokenizer treats differently: ours follows the slow one.
FTFY = [
    "ΟΔΟΣ Σίσυφος",  # final sigma: str.lower() vs per-character lowercasing
    "ｶﾀｶﾅ ﾊﾟﾝ", "ＡＢＣ\u3000ｄｅｆ\u3000１２３！",  # half/fullwidth forms
    "“curly” ‘single’ „low‟ ʼapos can’t", "’s ’t ’re",  # curly quotes
    "ﬁne ﬂow ﬀ ĳ ǆ ŉ Ǆemal",  # ligatures and digraphs
    "&amp; &lt;b&gt; &quot;q&quot; &#39;s &#x27; &nbsp; &copy; &amp;amp; &NTILDE; &notin; &not &amp",
    "Tom &amp; Jerry", "a &amp; b\nc <tag>\nd &amp; e", "x&amp;<|endoftext|>&amp;y", "&#128512; &#x1F600; &#0; &#65;",
    "\x80\x85\x93smart\x94\x9d",  # C1 controls read as Windows-1252
    "ctrl\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x1c\x1f\ufeffbom",  # terminal escapes, control characters
    "line\x85nel", "lone \ud800 surrogate \ud83d\ude00 paired",
    "!<|ENDOFTEXT|>", "x\u0345y", "&lt;|endoftext|&gt;", "a ＜|endoftext|＞ b", "x!&lt;|endoftext|&gt;",
]

# ids from transformers 4.57.3's slow CLIPTokenizer with ftfy 6.3.1 installed
GOLDEN = {
    "masterpiece, best quality, (red:1.2) circle": [12066, 267, 949, 3027, 267, 263, 736, 281, 272, 269, 273, 264, 7117],
    "Tom &amp; Jerry": [2435, 261, 9164],
    "“curly” don’t": [257, 20795, 257, 847, 713],
    "ＡＢＣ\u3000１２３！": [5334, 272, 273, 274, 256],
    "ﬁne": [3797],
    "ΟΔΟΣ": [138, 123, 138, 112, 138, 123, 139, 480],
    "a<|endoftext|>b": [320, 49407, 321],
    "!<|ENDOFTEXT|>": [0, 27, 347, 40786, 4160, 91, 285],
    "日本語のテキスト": [39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486],
    "\u00a0tab\tnew\nline  x": [14724, 686, 1148, 343],
    "x\u0345y": [343, 344],
    "\x93smart\x94": [257, 4115, 257],
}
# ids from open_clip 3.3.0's SimpleTokenizer (html_unescape=True)
GOLDEN_OPENCLIP = {
    "Tom &amp Jerry &copy": [2435, 261, 9164, 5811],
    "<b>&ldquo;x&rdquo;</b>": [283, 321, 29, 728, 506, 343, 728, 251, 34308, 321, 285],
    "a <end_of_text> b": [320, 49407, 321],
    "a <|endoftext|> b": [320, 27, 347, 40786, 4160, 91, 285, 321],
    "masterpiece, best quality, (red:1.2) circle": [12066, 267, 949, 3027, 267, 263, 736, 281, 272, 269, 273, 264, 7117],
}

# ftfy's mojibake repair is not reproduced: (text, ids with ftfy, ours)
MOJIBAKE = [("cafÃ©", [15304], [3471, 127, 352, 5811]), ("âœ” done", [13749, 1700], [26170, 129, 497, 257, 1700])]


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.default()


@pytest.fixture(scope="module")
def written(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tokenizer")
    tok.write_files(d)
    return d


# --- a re-statement of the slow tokenizers -----------------------------------------------------


class SlowReference:
    """transformers 4.x slow CLIPTokenizer (ftfy branch) and open_clip SimpleTokenizer, in short."""

    def __init__(self, data_dir, fix_text):
        import regex

        self.regex, self.fix_text = regex, fix_text
        self.vocab = json.loads(Path(data_dir, "vocab.json").read_text(encoding="utf-8"))
        lines = Path(data_dir, "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:49152 - 256 - 2 + 1]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in keep]
        self.byte_char = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
        self.cache = {}

    def bpe(self, word):
        if word not in self.cache:
            parts = list(word[:-1]) + [word[-1] + "</w>"]
            while len(parts) > 1:
                best = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(parts):
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self.cache[word] = [self.vocab[p] for p in parts]
        return self.cache[word]

    def words(self, text, specials):
        pattern = "|".join(map(re.escape, specials)) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        ids = []
        for word in self.regex.findall(pattern, text, flags=self.regex.IGNORECASE):
            if word in specials:
                ids.append(self.vocab["<|startoftext|>"] + specials.index(word))
            else:
                ids += self.bpe("".join(self.byte_char[b] for b in word.encode("utf-8")))
        return ids

    def encode(self, text):
        ids = []
        for i, piece in enumerate(re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text)):
            if i % 2:
                ids.append(self.vocab[piece])
            else:
                piece = self.regex.sub(r"\s+", " ", self.fix_text(piece)).strip().lower()
                ids += self.words(piece, ("<|startoftext|>", "<|endoftext|>"))
        return ids

    def encode_openclip(self, text):
        text = " ".join(html.unescape(html.unescape(self.fix_text(text))).strip().split()).lower()
        return self.words(text, ("<start_of_text>", "<end_of_text>"))


@pytest.fixture(scope="module")
def slow():
    ftfy = pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    return SlowReference(_DATA_DIR, ftfy.fix_text)


@pytest.fixture(scope="module")
def slow_no_mojibake_fix():
    ftfy = pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    return SlowReference(_DATA_DIR, lambda t: ftfy.fix_text(t, fix_encoding=False))


# --- vocabulary files --------------------------------------------------------------------------


def test_shipped_vocabulary_layout():
    vocab_bytes = Path(_DATA_DIR, "vocab.json").read_bytes()
    merges_text = Path(_DATA_DIR, "merges.txt").read_text(encoding="utf-8")
    vocab = json.loads(vocab_bytes)
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320 and vocab["jekyll</w>"] == 49405
    lines = merges_text.split("\n")
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and lines[-1] == "" and len(lines) == 48896
    assert (len(vocab_bytes), len(merges_text.encode())) == (961143, 524619)
    license_text = Path(_DATA_DIR, "LICENSE").read_text()
    assert "MIT License" in license_text and "Copyright (c) 2021 OpenAI" in license_text


def test_make_clip_vocab_reproduces_the_shipped_files():
    spec = importlib.util.spec_from_file_location("make_clip_vocab", REPO / "tools" / "make_clip_vocab.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    merges = Path(_DATA_DIR, "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    # OpenAI's file: an odd header line, the merges, then more merges that CLIP does not use.
    gz = gzip.compress(('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges + ["x y", "z w"])).encode())
    vocab_json, merges_txt = tool.build(gz)
    assert vocab_json == Path(_DATA_DIR, "vocab.json").read_bytes()
    assert merges_txt == Path(_DATA_DIR, "merges.txt").read_bytes()


# --- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids_of_the_slow_tokenizer(tok, text):
    assert tok.encode(text) == GOLDEN[text]


@pytest.mark.parametrize("text", list(GOLDEN_OPENCLIP))
def test_golden_ids_of_open_clip(tok, text):
    assert tok.encode(text, html_unescape=True) == GOLDEN_OPENCLIP[text]


def test_same_ids_as_slow_tokenizer(tok, slow):
    for text in PLAIN + FTFY:
        assert tok.encode(text) == slow.encode(text), repr(text)


def test_same_ids_as_open_clip(tok, slow):
    texts = PLAIN + FTFY + ["<b>&ldquo;x&rdquo;</b> &amp", "&lt;|endoftext|&gt; <END_OF_TEXT> !<end_of_text>"]
    assert tok.encode_batch(texts, html_unescape=True) == [slow.encode_openclip(t) for t in texts]


def test_mojibake_is_not_repaired(tok, slow, slow_no_mojibake_fix):
    for text, with_ftfy, ours in MOJIBAKE:
        assert slow.encode(text) == with_ftfy
        assert tok.encode(text) == ours == slow_no_mojibake_fix.encode(text)


def test_every_character_like_the_slow_tokenizer(tok, slow_no_mojibake_fix):
    """Each assigned code point between two letters: where ours differs from the slow tokenizer,
    it is because Oniguruma (tokenizers) and the regex module disagree on whether the character
    is a letter or digit: their Unicode tables differ in age (the regex module's are newer)."""
    import unicodedata

    import regex
    from tokenizers import Regex, pre_tokenizers

    slow = slow_no_mojibake_fix  # mojibake repair aside (test_mojibake_is_not_repaired)
    # Every code point below U+30000 and the tags, but only a sample of the big uniform blocks
    # (CJK ideographs, Hangul syllables, Yi, Tangut, private use).
    big = [(0x3400, 0x4DC0), (0x4E00, 0xA000), (0xA000, 0xA48D), (0xAC00, 0xD7A4), (0xE000, 0xF900),
           (0x17000, 0x18D09), (0x20000, 0x30000)]
    code_points = [c for c in range(0x30000) if not 0xD800 <= c < 0xE000 and not any(a < c < b for a, b in big)]
    code_points += [c for a, b in big for c in range(a, b, 97)] + list(range(0xE0000, 0xE0080))
    chars = [chr(c) for c in code_points if unicodedata.category(chr(c)) != "Cn"]
    batches = [chars[i:i + 256] for i in range(0, len(chars), 256)]
    texts = [" ".join(f"x{c}y" for c in batch) for batch in batches]
    suspects = [c for batch, text, ours in zip(batches, texts, tok.encode_batch(texts))
                if ours != slow.encode(text) for c in batch]
    differ = [c for c in suspects if tok.encode(f"x{c}y") != slow.encode(f"x{c}y")]
    onig = pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}"), behavior="removed", invert=True)
    for c in differ:
        in_onig = [w for w, _ in onig.pre_tokenize_str(c)] == [c]
        in_regex = regex.fullmatch(r"\p{L}|\p{N}", c) is not None
        assert in_onig != in_regex, f"U+{ord(c):04X}"
    assert len(differ) < 500, len(differ)  # none with Python 3.11 (Unicode 14)


@pytest.fixture(scope="module")
def hf_fast(written):
    transformers = pytest.importorskip("transformers")
    return [cls.from_pretrained(str(written), local_files_only=True)
            for cls in {transformers.CLIPTokenizer, transformers.CLIPTokenizerFast}]


def test_same_ids_as_transformers_fast_tokenizer(tok, hf_fast):
    for hf in hf_fast:
        for text in PLAIN:
            assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], repr(text)
        assert hf(PROMPT_75)["input_ids"] == [tok.bos_id] + tok.encode(PROMPT_75) + [tok.eos_id]


def test_known_differences_from_transformers_fast_tokenizer(tok, hf_fast):
    for hf in hf_fast:
        for text in FTFY:
            try:
                theirs = hf(text, add_special_tokens=False)["input_ids"]
            except TypeError:  # lone surrogates cannot enter the Rust tokenizer
                assert "\ud800" in text
                continue
            assert tok.encode(text) != theirs, repr(text)


def test_encode_batch_matches_encode(tok):
    texts = PLAIN + FTFY
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(PLAIN[:5]) == [tok.encode(t) for t in PLAIN[:5]]  # the batched path
    assert tok.encode_batch(["&lt;|endoftext|&gt;", "x"]) == [[49407], [343]]
    assert tok.encode_batch([]) == []


@pytest.mark.skipif(not os.environ.get("SDRT_SLOW_CLIP_PYTHONPATH"), reason="SDRT_SLOW_CLIP_PYTHONPATH not set")
@pytest.mark.parametrize("with_ftfy", [True, False])
def test_real_slow_tokenizer(tok, written, with_ftfy):
    script = (
        "import sys, json\n"
        + ("" if with_ftfy else "sys.modules['ftfy'] = None\n")
        + "sys.modules['torch'] = None\n"
        "import transformers\n"
        "assert transformers.__version__.startswith('4.'), transformers.__version__\n"
        "t = transformers.CLIPTokenizer.from_pretrained(sys.argv[1], local_files_only=True)\n"
        "print(json.dumps([t(x, add_special_tokens=False)['input_ids'] for x in json.load(sys.stdin)]))\n"
    )
    texts = PLAIN + FTFY + [m[0] for m in MOJIBAKE]
    env = dict(os.environ, PYTHONPATH=os.environ["SDRT_SLOW_CLIP_PYTHONPATH"])
    run = subprocess.run([sys.executable, "-c", script, str(written)], input=json.dumps(texts), env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    theirs = json.loads(run.stdout.splitlines()[-1])
    differ = [t for t, a, b in zip(texts, tok.encode_batch(texts), theirs) if a != b]
    if with_ftfy:
        assert differ == [m[0] for m in MOJIBAKE]
    else:
        # transformers without ftfy uses BERT's BasicTokenizer: no HTML/quote/width fixes, splits
        # CJK ideographs into words, drops control and format characters (ZWJ too).
        assert {"中文字符测试 你好, 世界!", "Tom &amp; Jerry", "emoji 😀🎉❤️👍🏽 👨‍👩‍👧 🇯🇵 ✔ 🏳️‍🌈"} <= set(differ)
        assert PROMPT_75 not in differ


# --- the rest of the API -----------------------------------------------------------------------


def test_properties_and_lookups(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (49406, 49407, 49407, 49408)
    assert tok.token_to_id("a</w>") == 320 and tok.token_to_id("no such token") is None
    assert tok.id_to_token(320) == "a</w>" and tok.id_to_token(49406) == "<|startoftext|>"
    assert tok.id_to_token(10**6) is None
    assert tok.encode("") == [] and tok.encode("  \n ") == []
    assert tok.encode("<|startoftext|>a photo<|endoftext|>") == [49406, 320, 1125, 49407]
    assert ClipTokenizer.default() is tok


def test_from_dir_and_write_files(tok, written, tmp_path):
    files = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(os.listdir(written)) == files
    assert Path(written, "vocab.json").read_bytes() == Path(_DATA_DIR, "vocab.json").read_bytes()
    assert Path(written, "merges.txt").read_bytes() == Path(_DATA_DIR, "merges.txt").read_bytes()
    config = json.loads(Path(written, "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    assert json.loads(Path(written, "special_tokens_map.json").read_text())["pad_token"] == "<|endoftext|>"
    again = ClipTokenizer.from_dir(written)
    assert again.encode_batch(PLAIN + FTFY) == tok.encode_batch(PLAIN + FTFY)
    again.write_files(tmp_path / "a" / "b")  # creates folders, overwrites, leaves no temporaries
    again.write_files(tmp_path / "a" / "b")
    assert sorted(os.listdir(tmp_path / "a" / "b")) == sorted(os.listdir(written))


def test_errors(tmp_path):
    with pytest.raises(SdrtError, match="vocab.json: missing"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(SdrtError, match=r"merges.txt:2: a merge is two tokens"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na q\n")
    with pytest.raises(SdrtError, match="not a BPE vocabulary"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("[1, 2]")
    with pytest.raises(SdrtError, match="not a JSON object"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(SdrtError, match="lacks"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{")
    with pytest.raises(SdrtError, match="vocab.json: cannot read CLIP vocabulary: Expecting"):
        ClipTokenizer.from_dir(tmp_path)


def test_imports_without_torch_or_transformers():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        "from sdrt.runtime.text.tokenizer import ClipTokenizer\n"
        "assert ClipTokenizer.default().encode('a photo of a cat') == [320, 1125, 539, 320, 2368]\n"
        "assert sys.modules['torch'] is None and sys.modules['transformers'] is None\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_encode_speed(tok):
    assert len(tok.encode(PROMPT_75)) == 75
    times = []
    for _ in range(200):
        start = time.perf_counter()
        tok.encode(PROMPT_75)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 1e-3  # typically ~0.1 ms
