"""Prompt text -> conditioning: 77-token chunks as the webui builds them, through the text encoder graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime.bundle import Bundle
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.sessions import Session
from sdrt.runtime.spec import TEXT_TOKENS
from sdrt.runtime.tokenizer import ClipTokenizer

CHUNK_LENGTH = TEXT_TOKENS - 2  # 75 prompt tokens between BOS and EOS
COMMA_BACKTRACK = 20  # the webui's opts.comma_padding_backtrack default


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


def make_chunks(pieces: list[tuple[list[int], float]], *, bos: int, eos: int, comma: int | None,
                backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Split weighted token runs into 77-token chunks like the webui's ``tokenize_line``.

    A chunk holds 75 tokens; when it fills up and a comma stands within the last ``backtrack``
    tokens, the tokens after that comma move to the next chunk. Each chunk is framed by BOS and
    EOS and padded with EOS (SD 1.x pads with the end token). ``pieces`` with weight -1 and no
    tokens stand for ``BREAK``: they close the current chunk.
    """
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close():
        nonlocal chunk, last_comma
        pad = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [bos] + chunk.tokens + [eos] * pad + [eos]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * pad + [1.0]
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for tokens, weight in pieces:
        if weight == -1 and not tokens:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= backtrack):
                # Move the words after the last comma into the next chunk
                cut = last_comma + 1
                moved, moved_w = chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                close()
                chunk.tokens, chunk.multipliers = moved, moved_w
            if len(chunk.tokens) == CHUNK_LENGTH:
                close()
            chunk.tokens.append(token)
            chunk.multipliers.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


class TextEncoder:
    """The bundle's text encoder; token embeddings looked up here for sdrt bundles."""

    def __init__(self, bundle: Bundle, device: str = "cpu", tokenizer: ClipTokenizer | None = None):
        self.bundle = bundle
        self.session = Session(bundle.component("text_encoder"), device)
        tok_dir = bundle.path / "tokenizer"
        self.tokenizer = tokenizer or (ClipTokenizer.from_dir(tok_dir) if (tok_dir / "vocab.json").exists()
                                       else ClipTokenizer.default())
        info = bundle.text_encoder
        self.bos, self.eos = info.get("bos_token_id", 49406), info.get("eos_token_id", 49407)
        self.comma = self.tokenizer.token_to_id(",</w>")
        self.from_embeddings = "inputs_embeds" in self.session.inputs
        self.num_layers = info.get("num_layers")
        self.embeddings = None
        if self.from_embeddings:
            table = bundle.path / info["token_embeddings"]
            if not table.exists():
                raise SdrtError(f"bundle {bundle.path} is incomplete: missing {info['token_embeddings']}")
            self.embeddings = np.load(table, mmap_mode="r")

    def chunks(self, prompt: str) -> list[Chunk]:
        return make_chunks([(self.tokenizer.encode(prompt), 1.0)], bos=self.bos, eos=self.eos, comma=self.comma)

    def empty_chunk(self) -> Chunk:
        return Chunk([self.bos] + [self.eos] * (TEXT_TOKENS - 1), [1.0] * TEXT_TOKENS)

    def encode_tokens(self, ids: np.ndarray, clip_skip: int = 1) -> np.ndarray:
        """[n, 77] token ids -> [n, 77, hidden] states (CLIP skip n: layer -n, final norm applied)."""
        if clip_skip < 1:
            raise SdrtError(f"clip skip must be at least 1, got {clip_skip}")
        if not self.from_embeddings:
            if clip_skip > 1:
                raise SdrtError("CLIP skip needs a bundle exported by sdrt (this text encoder graph has no "
                                "per-layer states); re-export the checkpoint with `sdrt export`")
            return self.session.run({"input_ids": ids}, ["last_hidden_state"])["last_hidden_state"]
        if self.num_layers and clip_skip > self.num_layers:
            raise SdrtError(f"clip skip {clip_skip} exceeds the text encoder's {self.num_layers} layers")
        embeds = np.asarray(self.embeddings[ids], dtype=self.session.input_dtype("inputs_embeds"))
        if clip_skip == 1:
            return self.session.run({"inputs_embeds": embeds}, ["last_hidden_state"])["last_hidden_state"]
        states = self.session.run({"inputs_embeds": embeds}, ["normed_hidden_states"])["normed_hidden_states"]
        return states[len(states) - clip_skip]

    def encode(self, prompts: list[str], clip_skip: int = 1, min_chunks: int = 1) -> np.ndarray:
        """Prompts -> [len(prompts), 77 * chunks, hidden], every prompt padded with empty chunks
        to the longest (and to ``min_chunks``), each chunk encoded on its own and concatenated."""
        per_prompt = [self.chunks(p) for p in prompts]
        count = max(min_chunks, *(len(c) for c in per_prompt))
        per_prompt = [c + [self.empty_chunk()] * (count - len(c)) for c in per_prompt]
        ids = np.array([[c.tokens for c in chunks] for chunks in per_prompt], dtype=np.int64)  # [B, n, 77]
        mult = np.array([[c.multipliers for c in chunks] for chunks in per_prompt], dtype=np.float32)
        b, n, t = ids.shape
        z = self.encode_tokens(ids.reshape(b * n, t), clip_skip)
        z = z.reshape(b, n * t, -1)
        if not np.all(mult == 1.0):
            # Emphasis as the webui applies it: scale each token, then restore the original mean
            original_mean = z.mean()
            z = z * mult.reshape(b, n * t, 1)
            z = z * (original_mean / z.mean())
        return z
