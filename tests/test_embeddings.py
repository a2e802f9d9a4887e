"""Textual inversion: files read without torch, refused when unsafe or misshapen, matched by name."""

from __future__ import annotations

import hashlib
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline.txt2img import GenerationParams, Pipeline
from sdrt.runtime.text.embeddings import EmbeddingLibrary, load_embedding, read_safetensors
from sdrt.runtime.text.tokenizer import ClipTokenizer

from conftest import run_sdrt

WIDTH = 32  # the tiny model's text encoder


def a1111_pt(path, vectors: torch.Tensor, name="x", step=500):
    """What the webui's ``Embedding.save`` writes."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": step,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, path)
    return path


@pytest.fixture(scope="module")
def vectors():
    g = torch.Generator().manual_seed(5)
    return {n: torch.randn(n, WIDTH, generator=g) for n in (1, 2, 3)}


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory, vectors):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("embeddings")
    a1111_pt(d / "mystyle.pt", vectors[3])
    # an old trainer's file: an nn.ParameterDict of a half-precision parameter
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors[2].half())})},
               d / "OldTrainer.pt")
    torch.save({"<concept>": vectors[1][0].bfloat16()}, d / "concept.bin")
    save_file({"emb_params": vectors[2]}, str(d / "bad-hands.safetensors"))
    save_file({"emb_params": vectors[1]}, str(d / "bad.safetensors"))
    (d / "sub").mkdir()
    save_file({"string_to_param.*": vectors[2].bfloat16()}, str(d / "sub" / "negemb.safetensors"))
    a1111_pt(d / "wide.pt", torch.randn(2, 768))
    save_file({"a": vectors[1], "b": vectors[1].clone()}, str(d / "twoterms.safetensors"))
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(d / "xlembed.safetensors"))
    (d / "empty.pt").write_bytes(b"")
    (d / "notes.txt").write_text("not an embedding")
    return d


def test_reads_every_format_without_torch(emb_dir, vectors):
    e = load_embedding(emb_dir / "mystyle.pt")
    assert e.name == "mystyle" and e.step == 500 and e.vectors.dtype == np.float32
    assert np.array_equal(e.vectors, vectors[3].numpy())
    assert e.sha256 == hashlib.sha256((emb_dir / "mystyle.pt").read_bytes()).hexdigest()
    assert e.shorthash == e.sha256[:12]
    old = load_embedding(emb_dir / "OldTrainer.pt")
    assert np.array_equal(old.vectors, vectors[2].half().float().numpy())
    concept = load_embedding(emb_dir / "concept.bin")  # a diffusers concept: one 1-D vector
    assert concept.vectors.shape == (1, WIDTH)
    assert np.array_equal(concept.vectors[0], vectors[1][0].bfloat16().float().numpy())
    st = load_embedding(emb_dir / "sub" / "negemb.safetensors")
    assert np.array_equal(st.vectors, vectors[2].bfloat16().float().numpy())


def test_strided_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    a1111_pt(tmp_path / "t.pt", base.t()[1:3])  # a transposed slice: offset and strides into the storage
    assert np.array_equal(load_embedding(tmp_path / "t.pt").vectors, base.t()[1:3].numpy())


def test_safetensors_reader_matches_the_library(emb_dir):
    from safetensors.numpy import load_file

    for name in ("bad-hands.safetensors", "twoterms.safetensors"):
        ours, theirs = read_safetensors(emb_dir / name), load_file(str(emb_dir / name))
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_unsafe_pickles_are_refused_naming_the_global(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(SdrtError, match=r"evil\.pt: refusing to load (posix|os)\.system \(a weights file holds only "
                                        r"tensors and plain containers\)$"):
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()

    class Evaluated:
        def __reduce__(self):
            return eval, ("1 + 1",)

    torch.save({"string_to_param": {"*": Evaluated()}}, tmp_path / "eval.pt")
    with pytest.raises(SdrtError, match=r"refusing to load builtins\.eval"):
        load_embedding(tmp_path / "eval.pt")


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b"\x80\x02}q\x00."), r"not a zip-format torch file"),
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), r"not a zip-format torch file"),
    (lambda p: zipfile.ZipFile(p, "w").writestr("x/data.pkl", b"\x80\x02}q\x00(X"), r"unreadable pickle"),
    (lambda p: zipfile.ZipFile(p, "w").writestr("x/other", b""), r"not a torch file"),
])
def test_malformed_files_are_one_line(tmp_path, write, message):
    path = tmp_path / "broken.pt"
    write(path)
    with pytest.raises(SdrtError, match=message) as e:
        load_embedding(path)
    assert "\n" not in str(e.value)


def test_malformed_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    header = b'{"t": {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, 100]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    with pytest.raises(SdrtError, match=r"x\.safetensors: tensor 't' has the wrong size$"):
        load_embedding(path)
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(SdrtError, match=r"not a safetensors file$"):
        load_embedding(path)


@pytest.fixture(scope="module")
def library(emb_dir):
    return EmbeddingLibrary(emb_dir, ClipTokenizer.default(), WIDTH)


def test_library_finds_names_in_token_space(library):
    tok = ClipTokenizer.default()
    assert "mystyle" in library and "OldTrainer" in library and "negemb" in library
    assert "empty" not in library and "notes" not in library
    tokens = tok.encode("a photo, bad-hands, bad hands, BAD, oldtrainer")
    found = {}
    for i in range(len(tokens)):
        hit = library.find(tokens, i)
        if hit:
            found[i] = (hit[0].name, hit[1])
    # longest name first; names are matched after the tokenizer's lower-casing
    names = [v for _, v in sorted(found.items())]
    assert names == [("bad-hands", len(tok.encode("bad-hands"))), ("bad", 1), ("bad", 1),
                     ("OldTrainer", len(tok.encode("OldTrainer")))]


def test_files_are_read_only_when_named(library):
    # twoterms, xlembed and wide would be refused: nothing named them yet
    tok = ClipTokenizer.default()
    with pytest.raises(SdrtError, match=r"^embedding 'wide' \(wide\.pt\) has 768-wide vectors; this model's text "
                                        r"encoder takes 32-wide ones$"):
        library.find(tok.encode("wide"), 0)
    with pytest.raises(SdrtError, match=r"twoterms\.safetensors: an embedding file holds one tensor; this one holds "
                                        r"2 \(a, b\)$"):
        library.find(tok.encode("twoterms"), 0)
    with pytest.raises(SdrtError, match=r"an SDXL embedding"):
        library.find(tok.encode("xlembed"), 0)


@pytest.fixture(scope="module")
def ti_pipeline(tiny_bundle, emb_dir):
    return Pipeline(tiny_bundle, embeddings_dir=emb_dir)


def test_unknown_names_stay_text(ti_pipeline, tiny_pipeline):
    te = ti_pipeline.text_encoder
    prompt = "a photo of nosuchembedding, (mystyled:1.2)"
    assert [c.tokens for c in te.chunks(prompt)] == [c.tokens for c in tiny_pipeline.text_encoder.chunks(prompt)]
    assert not any(c.fixes for c in te.chunks(prompt))


def test_vectors_replace_token_embeddings_before_the_graph(ti_pipeline, vectors):
    te = ti_pipeline.text_encoder
    (chunk,) = te.chunks("a mystyle cat")
    a, cat = te.tokenizer.encode("a cat")
    assert chunk.tokens[:6] == [te.bos, a, 0, 0, 0, cat] and [(o, e.name) for o, e in chunk.fixes] == [(1, "mystyle")]
    embeds = np.asarray(te.embeddings[np.array([chunk.tokens])], dtype=np.float32)
    embeds[0, 2:5] = vectors[3].numpy()
    expected = te.session.run({"inputs_embeds": embeds}, ["last_hidden_state"])["last_hidden_state"]
    assert np.array_equal(te.encode(["a mystyle cat"]), expected)


def test_embeddings_count_toward_the_chunk(ti_pipeline):
    te = ti_pipeline.text_encoder
    prompt = " ".join(["cat"] * 73) + " mystyle dog"
    chunks = te.chunks(prompt)
    assert len(chunks) == 2 and chunks[0].fixes == [] and [o for o, _ in chunks[1].fixes] == [0]
    assert chunks[0].tokens[74:] == [te.eos] * 3  # two places left: the 3 vectors start the next chunk


def test_ti_hashes_in_the_infotext(ti_pipeline, emb_dir):
    p = GenerationParams("a mystyle cat, (bad-hands:1.1) AND concept:0.5", negative_prompt="negemb, bad",
                         steps=2, sampler_name="Euler", seed=3)
    (r,) = ti_pipeline.generate(p)

    def h(rel):
        return hashlib.sha256((emb_dir / rel).read_bytes()).hexdigest()[:12]

    # the webui's order: each encoder call before the ones already recorded; the negative prompt first
    expected = (f'TI hashes: "concept: {h("concept.bin")}, mystyle: {h("mystyle.pt")}, '
                f'bad-hands: {h("bad-hands.safetensors")}, negemb: {h("sub/negemb.safetensors")}, '
                f'bad: {h("bad.safetensors")}"')
    assert expected in r.infotext


def test_cli_embeddings_without_torch(tiny_bundle, emb_dir, tmp_path, no_torch_dir):
    out = tmp_path / "out"
    r = run_sdrt("generate", "a mystyle cat, OldTrainer", "--model", tiny_bundle, "--steps", 2, "--seed", 4,
                 "--embeddings-dir", emb_dir, "-o", out, pythonpath_first=no_torch_dir)
    assert r.returncode == 0, r.stderr
    text = Image.open(out / "00000-4.png").text["parameters"]
    assert re.search(r'TI hashes: "mystyle: [0-9a-f]{12}, OldTrainer: [0-9a-f]{12}"', text)
    bad = run_sdrt("generate", "a wide cat", "--model", tiny_bundle, "--steps", 1, "--embeddings-dir", emb_dir,
                   "-o", out, pythonpath_first=no_torch_dir)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == ("error: embedding 'wide' (wide.pt) has 768-wide vectors; this "
                                                   "model's text encoder takes 32-wide ones")
