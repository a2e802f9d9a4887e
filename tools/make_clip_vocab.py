#!/usr/bin/env python3
"""Regenerate runtime/data/clip/{vocab.json,merges.txt} from OpenAI CLIP's BPE file.

Input: ``bpe_simple_vocab_16e6.txt.gz`` as published by OpenAI CLIP (MIT, see
runtime/data/clip/LICENSE); a byte-identical copy ships in the open-clip-torch wheel
(``pip download --no-deps open-clip-torch``, unzip, ``open_clip/bpe_simple_vocab_16e6.txt.gz``;
sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a).

Output is the Hugging Face layout that ``openai/clip-vit-large-patch14`` uses:
vocab.json is one line of JSON in id order (256 byte characters, the same 256 with
``</w>``, one token per merge, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407);
merges.txt is ``#version: 0.2`` followed by the 48894 merges used by CLIP.

Standard library only.  Usage: python tools/make_clip_vocab.py BPE_GZ [OUT_DIR]
"""

import gzip
import hashlib
import json
import os
import sys

EXPECTED_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def byte_chars():
    """The 256 characters standing for the bytes in byte-level BPE, in vocabulary order: the
    printable Latin-1 bytes as themselves, then the other bytes as U+0100, U+0101, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build(gz_bytes):
    text = gzip.decompress(gz_bytes).decode("utf-8")
    lines = text.split("\n")
    merges = lines[1 : 1 + N_MERGES]  # line 0 is a header
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError("unexpected BPE file layout")
    base = byte_chars()
    tokens = base + [c + "</w>" for c in base] + [m.replace(" ", "") for m in merges] + SPECIALS
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(tokens) != 49408:
        raise ValueError("vocabulary is not 49408 distinct tokens")
    vocab_json = json.dumps(vocab, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_json.encode("utf-8"), merges_txt.encode("utf-8")


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    gz_path = argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = argv[2] if len(argv) == 3 else os.path.join(os.path.dirname(here), "runtime", "data", "clip")
    with open(gz_path, "rb") as f:
        gz = f.read()
    digest = hashlib.sha256(gz).hexdigest()
    if digest != EXPECTED_SHA256:
        sys.exit(f"{gz_path}: sha256 {digest} is not the OpenAI CLIP file")
    vocab_json, merges_txt = build(gz)
    os.makedirs(out_dir, exist_ok=True)
    for name, data in (("vocab.json", vocab_json), ("merges.txt", merges_txt)):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        print(f"wrote {path} ({len(data)} bytes)")


if __name__ == "__main__":
    main(sys.argv)
