"""CLIP byte-level BPE tokenizer on the ``tokenizers`` library (no torch, no transformers).

``encode`` gives the ids that the webui's SD 1.x text path gets from transformers' slow
(pure-Python) ``CLIPTokenizer`` with ``ftfy`` installed: ``<|startoftext|>``/``<|endoftext|>``
written in the prompt are cut out as specials, each piece between them gets ``ftfy.fix_text``,
whitespace collapsed, ``strip``, ``str.lower``, then the CLIP word regex and byte-level BPE with
``</w>`` word ends. ``encode(..., html_unescape=True)`` gives OpenAI's/open_clip's
``SimpleTokenizer`` instead (the webui's SD 2.x and SDXL OpenCLIP-G path): ``html.unescape``
twice after ftfy, and ``<start_of_text>``/``<end_of_text>`` as the spellings of the specials.

ftfy is not a dependency: ``_fix_text`` redoes the table-driven part of ``fix_text`` (HTML
entities, C1 controls, Latin ligatures, full/half-width forms, curly quotes, surrogates, terminal
escapes, control characters, NFC). Known differences from slow CLIPTokenizer + ftfy (see
tests/test_tokenizer.py):

* ftfy's mojibake repair (``fix_encoding``) is not done: ``"cafÃ©"`` is tokenized as written
  (ftfy: ``"café"``), as are ``"âœ”"`` (ftfy: ``"✔"``) and ``"Ã¢â‚¬â„¢"`` (ftfy: ``"'"``).
* Characters assigned after Unicode 14 (2021): Oniguruma's letter/digit classes (here) and the
  ``regex`` module's (slow tokenizer) come from different Unicode versions, and lower-casing
  follows the running Python's tables; prompts do not use them.

transformers' fast ``CLIPTokenizer`` does none of ftfy's clean-up and lower-cases character by
character; it differs from the slow one (and this one) on e.g. ``"&amp;"``, ``"“quoted”"``,
``"ＡＢＣ"``, ``"ﬁ"``, ``"ΟΔΟΣ"`` (final sigma), ``"<|ENDOFTEXT|>"``, ``"\\x85"``.
"""

from __future__ import annotations

import functools
import html
import html.entities
import json
import os
import re
import unicodedata

from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import BPE

from sdrt.runtime.errors import SdrtError

__all__ = ["BOS_TOKEN", "BOS_TOKEN_ID", "ClipTokenizer", "EOS_TOKEN", "EOS_TOKEN_ID"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Their ids in CLIP's vocabulary (the last two of its 49408 entries); SD 1.x pads with EOS.
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
# open_clip's SimpleTokenizer spells the same two specials differently.
_OPENCLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")

# CLIP's word pattern (on lower-cased text), after the alternatives for the specials: English
# contractions, runs of letters, single digits, runs of anything else but whitespace. What does
# not match (whitespace) is dropped.
_WORD_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"

_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "clip")

# --- ftfy.fix_text, minus mojibake repair ------------------------------------------------------

# Text made only of these characters needs no fixing beyond whitespace and case: printable ASCII
# without "&" (HTML entities), plus tab, newline, carriage return and form feed.
_PLAIN = re.compile(r"[\t\n\x0c\r\x20-\x25\x27-\x7e]*\Z")
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_C1 = re.compile(r"[\x80-\x9f]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ANSI_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
_SPECIAL_SPLIT = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = re.compile(r"\s+")
_LINE = re.compile(r"[^\n]*\n|[^\n]+")

# Latin ligatures and digraphs that ftfy spells out (typographic ligatures only; NFKC would do more).
_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}


@functools.lru_cache(maxsize=None)
def _char_tables() -> tuple:
    """str.translate tables: (ligatures, full/half-width forms, curly quotes), (control characters)."""
    fold = {ord(k): v for k, v in _LIGATURES.items()}
    fold[0x3000] = " "  # ideographic space
    for cp in range(0xFF01, 0xFFF0):  # fullwidth ASCII, halfwidth katakana/hangul, symbols
        wide = chr(cp)
        narrow = unicodedata.normalize("NFKC", wide)
        if narrow != wide:
            fold[cp] = narrow
    for cp in [0x2BC, *range(0x2018, 0x201C)]:
        fold[cp] = "'"
    for cp in range(0x201C, 0x2020):
        fold[cp] = '"'
    # Control characters other than whitespace, deprecated format controls, the BOM, interlinear
    # annotation marks and the object replacement character are deleted.
    controls = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                              0xFEFF, *range(0xFFF9, 0xFFFD)])
    return fold, controls


@functools.lru_cache(maxsize=None)
def _entities() -> dict:
    """Named HTML5 entities that need their ';', plus upper-cased spellings of lower-case names."""
    table = {}
    for name, char in html.entities.html5.items():
        if not name.endswith(";"):
            continue
        table["&" + name] = char
        upper = "&" + name.upper()
        if name == name.lower() and html.unescape(upper) == upper:
            table[upper] = char.upper()
    return table


def _unescape_entity(match: re.Match) -> str:
    entity = match.group(0)
    char = _entities().get(entity)
    if char is not None:
        return char
    if entity.startswith("&#"):
        char = html.unescape(entity)
        return entity if ";" in char else char
    return entity


def _c1_to_cp1252(match: re.Match) -> str:
    # C1 controls are almost always Windows-1252 bytes decoded as Latin-1; the five bytes that
    # Windows-1252 leaves undefined stay as they are.
    byte = match.group(0).encode("latin-1")
    try:
        return byte.decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _pair_surrogates(match: re.Match) -> str:
    high, low = (ord(c) for c in match.group(0))
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


def _fix_line(line: str, unescape: bool) -> str:
    fold, controls = _char_tables()
    while True:  # ftfy repeats its fixes until nothing changes ("&amp;amp;" -> "&")
        before = line
        if unescape and "&" in line:
            line = _ENTITY.sub(_unescape_entity, line)
        line = _C1.sub(_c1_to_cp1252, line).translate(fold)
        if _SURROGATE.search(line):
            line = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_pair_surrogates, line))
        if "\x1b" in line:
            line = _ANSI_ESCAPE.sub("", line)
        line = unicodedata.normalize("NFC", line.translate(controls))
        if line == before:
            return line


def _fix_text(text: str) -> str:
    """ftfy.fix_text's table-driven fixes, line by line like ftfy: HTML entities are left alone
    from the first line that holds a '<' on."""
    if _PLAIN.match(text):
        return text
    out = []
    unescape = True
    for line in _LINE.findall(text):
        if unescape and "<" in line:
            unescape = False
        out.append(_fix_line(line, unescape))
    return "".join(out)


def _clean(text: str, html_unescape: bool = False) -> str:
    """What the slow tokenizer does to special-free text before its word regex: fix, collapse
    spaces, lower. ``html_unescape`` adds open_clip's ``html.unescape(html.unescape(...))``."""
    text = _fix_text(text)
    if html_unescape:
        text = html.unescape(html.unescape(text))
    text = _WHITESPACE.sub(" ", text).strip().lower()
    if "\u0345" in text:
        # The slow tokenizers' case-insensitive word regex matches COMBINING GREEK YPOGEGRAMMENI
        # (it case-folds to a letter) with neither class, so it parts words like a space.
        text = text.replace("\u0345", " ")
    return text


# --- the tokenizer -----------------------------------------------------------------------------


def _bpe_pipeline(model: BPE, specials: tuple) -> tuple:
    """A Tokenizer (no normalizer: _clean() did that) and its word splitter, with ``specials`` as
    the first alternatives of the word regex."""
    words = pre_tokenizers.Split(
        Regex("|".join(re.escape(s) for s in specials) + "|" + _WORD_PATTERN), behavior="removed", invert=True)
    tok = Tokenizer(model)
    # Words hold no spaces; ByteLevel only maps their bytes onto the BPE alphabet.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [words, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok, words


class ClipTokenizer:
    """CLIP BPE tokenizer: ``encode`` returns ids without BOS/EOS, as prompt fragments need."""

    def __init__(self, vocab: dict, merges: list, *, source: str = "CLIP vocabulary") -> None:
        try:
            bos, eos = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        except KeyError:
            raise SdrtError(f"{source}: lacks {BOS_TOKEN} or {EOS_TOKEN}") from None
        try:
            model = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                        unk_token=EOS_TOKEN, fuse_unk=False, dropout=None)
        except Exception as e:  # tokenizers raises plain Exception for merges outside the vocabulary
            raise SdrtError(f"{source}: not a BPE vocabulary ({_first_line(e)})") from None
        self._vocab, self._merges, self._model = vocab, merges, model
        self._bos, self._eos = bos, eos
        self._hf = _bpe_pipeline(model, (BOS_TOKEN, EOS_TOKEN)) + ({BOS_TOKEN: bos, EOS_TOKEN: eos},)
        self._oc = None  # the open_clip pipeline, built on first use

    # -- construction --

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> "ClipTokenizer":
        """Load a Hugging Face ``vocab.json`` + ``merges.txt`` pair."""
        try:
            with open(vocab_json, encoding="utf-8") as f:
                vocab = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise SdrtError(f"{vocab_json}: cannot read CLIP vocabulary: {_first_line(e)}") from None
        try:
            with open(merges_txt, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise SdrtError(f"{merges_txt}: cannot read CLIP merges: {_first_line(e)}") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise SdrtError(f"{vocab_json}: not a JSON object of token ids")
        merges = []
        for n, line in enumerate(lines, 1):
            if not line or (n == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise SdrtError(f"{merges_txt}:{n}: a merge is two tokens separated by one space")
            merges.append((pair[0], pair[1]))
        # Like the slow tokenizer, use only the first 49152 - 256 - 2 merges (all of CLIP's file).
        return cls(vocab, merges[: 49152 - 256 - 2], source=str(vocab_json))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ClipTokenizer":
        """Load a bundle's (or a diffusers pipeline's) ``tokenizer/`` folder."""
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        for p in (vocab, merges):
            if not os.path.isfile(p):
                raise SdrtError(f"{p}: missing (a CLIP tokenizer folder holds vocab.json and merges.txt)")
        return cls.from_files(vocab, merges)

    @classmethod
    def default(cls) -> "ClipTokenizer":
        """OpenAI CLIP's vocabulary, shipped with sdrt (SD 1.x, 2.x and SDXL all use it); cached."""
        return _default()

    # -- encoding --

    def encode(self, text: str, *, html_unescape: bool = False) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, as transformers' slow ``CLIPTokenizer`` with
        ftfy gives them (the webui's SD 1.x and SDXL CLIP-L path). ``html_unescape=True`` gives
        open_clip's ``SimpleTokenizer`` instead (the webui's SD 2.x and SDXL OpenCLIP-G path),
        which also decodes entities like ``&amp`` or ``&lt;b&gt;`` that ftfy leaves alone."""
        if html_unescape:
            return self._encode_clean(self._openclip(), _clean(text, html_unescape=True))
        if "<|" in text and _SPECIAL_SPLIT.search(text):
            # transformers cuts specials (exact spelling) out first and cleans the pieces apart.
            ids = []
            for i, piece in enumerate(_SPECIAL_SPLIT.split(text)):
                if i % 2:
                    ids.append(self._hf[2][piece])
                else:
                    ids += self._encode_clean(self._hf, _clean(piece))
            return ids
        return self._encode_clean(self._hf, _clean(text))

    def encode_batch(self, texts: list[str], *, html_unescape: bool = False) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in one call to ``tokenizers`` where no specials are about."""
        if not html_unescape and not any("<" in t for t in texts):
            cleaned = [_clean(t) for t in texts]
            if not any("<" in t for t in cleaned):  # "&lt;", "＜" become "<" in cleaning
                return [e.ids for e in self._hf[0].encode_batch(cleaned, add_special_tokens=False)]
        return [self.encode(t, html_unescape=html_unescape) for t in texts]

    def _encode_clean(self, pipeline: tuple, text: str) -> list[int]:
        tok, words, specials = pipeline
        if "<" not in text or not any(s in text for s in specials):
            return tok.encode(text, add_special_tokens=False).ids
        # A special spelled in cleaned text (say "<|ENDOFTEXT|>" lower-cased): the slow tokenizers
        # give it its id where the word regex matches it as a word ("x <|endoftext|>", not
        # "x!<|endoftext|>"). The regex runs left to right, so cutting at word bounds is exact.
        ids, pos = [], 0
        for word, (start, end) in words.pre_tokenize_str(text):
            if word in specials:
                ids += tok.encode(text[pos:start], add_special_tokens=False).ids
                ids.append(specials[word])
                pos = end
        return ids + tok.encode(text[pos:], add_special_tokens=False).ids

    def _openclip(self) -> tuple:
        if self._oc is None:
            self._oc = _bpe_pipeline(self._model, _OPENCLIP_SPECIALS) + (
                dict(zip(_OPENCLIP_SPECIALS, (self._bos, self._eos))),)
        return self._oc

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        """SD 1.x pads with ``eos_id`` (SD 2.x's OpenCLIP pads with 0, which is ``"!"``)."""
        return self._eos

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf[0].id_to_token(token_id)

    # -- writing --

    def write_files(self, dst_dir: str | os.PathLike, pad_token: str = EOS_TOKEN) -> None:
        """Write a diffusers pipeline's ``tokenizer/`` folder (vocab.json, merges.txt,
        tokenizer_config.json, special_tokens_map.json); transformers loads it offline.
        ``pad_token``: ``"!"`` (id 0) for OpenCLIP encoders, as their published tokenizers pad."""
        def added(content: str) -> dict:
            return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

        bos, eos = added(BOS_TOKEN), added(EOS_TOKEN)
        files = {
            "vocab.json": json.dumps(self._vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
            "special_tokens_map.json": {"bos_token": bos, "eos_token": eos, "pad_token": pad_token, "unk_token": eos},
            "tokenizer_config.json": {
                "add_prefix_space": False,
                "added_tokens_decoder": {
                    str(self._bos): dict(bos, special=True), str(self._eos): dict(eos, special=True)},
                "bos_token": BOS_TOKEN,
                "clean_up_tokenization_spaces": False,
                "do_lower_case": True,
                "eos_token": EOS_TOKEN,
                "errors": "replace",
                "model_max_length": 77,
                "pad_token": pad_token,
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": EOS_TOKEN,
            },
        }
        try:
            os.makedirs(dst_dir, exist_ok=True)
            for name, content in files.items():
                if not isinstance(content, str):
                    content = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
                path = os.path.join(dst_dir, name)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                    f.write(content)
                os.replace(tmp, path)
        except OSError as e:
            raise SdrtError(f"cannot write tokenizer files to {dst_dir}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@functools.lru_cache(maxsize=1)
def _default() -> ClipTokenizer:
    return ClipTokenizer.from_files(os.path.join(_DATA_DIR, "vocab.json"), os.path.join(_DATA_DIR, "merges.txt"))
