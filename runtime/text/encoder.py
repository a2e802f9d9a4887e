"""Prompt text -> conditioning, as the webui builds it (``sd_hijack_clip.py``, ``prompt_parser.py``).

A prompt's ``AND`` parts each get a schedule of texts (prompt editing, alternation); each text is
parsed for emphasis, tokenized run by run, split into 77-token chunks (75 tokens between BOS and
EOS, with the webui's comma back-off and ``BREAK``), textual inversion names replaced by their
vectors, and encoded chunk by chunk. Token embeddings are looked up here and fed to the graph's
``inputs_embeds``, which is what makes embeddings and weighting free at run time.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sdrt.runtime.backends import Backend, open_component
from sdrt.runtime.bundle import Bundle
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.spec import TEXT_TOKENS
from sdrt.runtime.text.embeddings import Embedding, EmbeddingLibrary
from sdrt.runtime.text.extra_networks import parse_prompt as parse_extra_networks
from sdrt.runtime.text.prompt import parse_emphasis, prompt_schedule, split_and
from sdrt.runtime.text.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

CHUNK_LENGTH = TEXT_TOKENS - 2  # 75 prompt tokens between BOS and EOS
COMMA_BACKTRACK = 20  # the webui's opts.comma_padding_backtrack default
# Limits that keep absurd prompts (megabytes of text, thousands of BREAKs or ANDs) in bounded
# time and memory; the webui has none and runs out of memory instead.
MAX_CHUNKS = 128  # per text: 9600 tokens
MAX_ENCODED_CHUNKS = 1024  # per prompt, over its distinct scheduled texts
MAX_SUBPROMPTS = 32  # AND parts: each is a row of every UNet batch
ENCODE_BATCH = 16  # chunks per text encoder run (the largest batch of its engine profile)


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    # (offset among the chunk's 75 prompt tokens, embedding): vectors that replace tokens there
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


def make_chunks(pieces: list[tuple[list[int] | None, float]], *, bos: int, eos: int, comma: int | None,
                backtrack: int = COMMA_BACKTRACK, embeddings: EmbeddingLibrary | None = None) -> list[Chunk]:
    """Split weighted token runs into 77-token chunks like the webui's ``tokenize_line``.

    A chunk holds 75 tokens; when it fills up and a comma stands within the last ``backtrack``
    tokens, the tokens after that comma move to the next chunk. Each chunk is framed by BOS and
    EOS and padded with EOS (SD 1.x pads with the end token). A piece whose tokens are None is
    ``BREAK``: it closes the current chunk. Where ``embeddings`` names an embedding at a token,
    its vectors take as many places (all in one chunk: an embedding that does not fit starts the
    next one), weighted like the run they stand in.
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
        if tokens is None:
            close()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= backtrack):
                # Move the words after the last comma into the next chunk. Embeddings among them
                # move with them; the webui leaves their vectors behind in the full chunk (over
                # its padding) and feeds token 0 in their places (docs/DIFFERENCES.md).
                cut = last_comma + 1
                moved = Chunk(chunk.tokens[cut:], chunk.multipliers[cut:],
                              [(offset - cut, e) for offset, e in chunk.fixes if offset >= cut])
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                chunk.fixes = [(offset, e) for offset, e in chunk.fixes if offset < cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK_LENGTH:
                close()
            found = embeddings.find(tokens, position) if embeddings is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            embedding, name_tokens = found
            n = len(embedding.vectors)
            if len(chunk.tokens) + n > CHUNK_LENGTH:
                close()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * n
            chunk.multipliers += [weight] * n
            position += name_tokens
    if chunk.tokens or not chunks:
        close()
    return chunks


@dataclass(frozen=True, eq=False)
class CondSchedule:
    """One prompt's conditioning over the sampling steps (the webui's ``ScheduledPromptConditioning``
    list): ``conds[i]`` ([tokens, width]) serves while the step counter is at most ``ends[i]``."""

    ends: tuple[int, ...]
    conds: tuple[np.ndarray, ...]
    embeddings: tuple[Embedding, ...] = ()  # used, in the order the webui records them
    padded: bool = False  # empty chunks appended to match the other side of CFG

    def at(self, step: int) -> np.ndarray:
        for end, cond in zip(self.ends, self.conds):
            if step <= end:
                return cond
        return self.conds[0]  # past the last end the webui falls back to the first entry

    @property
    def tokens(self) -> int:
        return self.conds[0].shape[0]

    def extended(self, tokens: int, fill: np.ndarray | None = None) -> CondSchedule:
        """Lengthened to ``tokens`` rows: with ``fill`` ([77, width]) repeated, or else with each
        entry's last row repeated (the webui's ``stack_conds`` for ``AND`` parts)."""
        if tokens == self.tokens:
            return self
        extra = tokens - self.tokens
        conds = tuple(np.concatenate([c, np.tile(fill, (extra // len(fill), 1)) if fill is not None
                                      else np.repeat(c[-1:], extra, axis=0)]) for c in self.conds)
        return replace(self, conds=conds, padded=self.padded or fill is not None)


@dataclass(frozen=True, eq=False)
class MultiCond:
    """A positive prompt's ``AND`` parts: (schedule, weight) pairs, all of one length."""

    parts: tuple[tuple[CondSchedule, float], ...]

    def at(self, step: int) -> list[tuple[np.ndarray, float]]:
        return [(schedule.at(step), weight) for schedule, weight in self.parts]

    def stacked(self, step: int = 0) -> np.ndarray:
        """[parts, tokens, width]: the conditioning rows of one image at ``step``."""
        return np.stack([cond for cond, _ in self.at(step)])

    @property
    def tokens(self) -> int:
        return self.parts[0][0].tokens

    @property
    def padded(self) -> bool:
        return any(schedule.padded for schedule, _ in self.parts)


def ti_hashes(cond: MultiCond, uncond: CondSchedule) -> str | None:
    """The webui's ``TI hashes`` text: each encoder call puts its embeddings before those already
    recorded; the negative prompt is encoded first, then each distinct ``AND`` part."""
    calls = [uncond.embeddings]
    seen = []
    for schedule, _ in cond.parts:
        if all(schedule is not s for s in seen):
            seen.append(schedule)
            calls.append(schedule.embeddings)
    entries = [f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}"
               for used in reversed(calls) for e in used]
    return ", ".join(entries) or None


def strip_extra_networks(prompt: str, negative_prompt: str) -> str:
    """The prompt without its extra-network tags (``<lora:name:0.8>``), which sdrt does not apply
    yet: each is named in a warning. Tags in the negative prompt stay text, as in the webui."""
    text, networks = parse_extra_networks(prompt)
    if networks:
        log.warning("extra networks are not applied (sdrt has no LoRA or hypernetwork support yet); "
                    "removed from the prompt: %s",
                    ", ".join(n.tag if n.known else f"{n.tag} (unknown type)" for n in networks))
    _, in_negative = parse_extra_networks(negative_prompt)
    if in_negative:
        log.warning("extra-network tags in the negative prompt are encoded as text, as the webui does "
                    "(it reads them from the prompt only): %s", ", ".join(n.tag for n in in_negative))
    return text


def _finite(states: np.ndarray, session: Backend) -> np.ndarray:
    """The text encoder's states, or a one-line error naming the stage when they hold NaN/Inf."""
    if not np.all(np.isfinite(states)):
        raise SdrtError(f"the text encoder produced NaN/Inf ({Path(session.path).name})")
    return states


def _batch_mean(z: np.ndarray, weight: np.ndarray) -> float:
    """The mean of a batch [texts, ...] in which text k stands ``weight[k]`` times."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(weight @ z.reshape(len(z), -1).sum(axis=1, dtype=np.float64)) / (weight.sum() * z[0].size)


class TextEncoder:
    """The bundle's text encoder; token embeddings looked up here for sdrt bundles."""

    def __init__(self, bundle: Bundle, device: str = "cpu", tokenizer: ClipTokenizer | None = None,
                 embeddings_dir: str | Path | list | None = None, precision: str = "fp32"):
        self.bundle = bundle
        self.session = open_component(bundle, "text_encoder", device, precision)
        tok_dir = bundle.path / "tokenizer"
        self.tokenizer = tokenizer or (ClipTokenizer.from_dir(tok_dir) if (tok_dir / "vocab.json").exists()
                                       else ClipTokenizer.default())
        info = bundle.text_encoder
        self.bos, self.eos = info["bos_token_id"], info["eos_token_id"]
        self.comma = self.tokenizer.token_to_id(",</w>")
        self.from_embeddings = "inputs_embeds" in self.session.inputs
        self.num_layers = info.get("num_layers")
        self.embeddings = None
        if self.from_embeddings:
            table = bundle.path / info["token_embeddings"]
            if not table.exists():
                raise SdrtError(f"bundle {bundle.path} is incomplete: missing {info['token_embeddings']}")
            self.embeddings = np.load(table, mmap_mode="r")
        self.library = None
        if embeddings_dir is not None:
            width = self.embeddings.shape[1] if self.embeddings is not None else None
            self.library = EmbeddingLibrary(embeddings_dir, self.tokenizer, width)

    def chunks(self, text: str) -> list[Chunk]:
        """One prompt text (no ``AND``, no edits left) -> its chunks, emphasis and embeddings in."""
        runs = parse_emphasis(text)
        ids = self.tokenizer.encode_batch([t for t, _ in runs])
        pieces = [(None if (t == "BREAK" and w == -1) else tokens, w) for (t, w), tokens in zip(runs, ids)]
        return make_chunks(pieces, bos=self.bos, eos=self.eos, comma=self.comma, embeddings=self.library)

    def empty_chunk(self) -> Chunk:
        return Chunk([self.bos] + [self.eos] * (TEXT_TOKENS - 1), [1.0] * TEXT_TOKENS)

    def check_clip_skip(self, clip_skip: int) -> None:
        """One-line errors for a CLIP skip this text encoder cannot give."""
        if clip_skip < 1:
            raise SdrtError(f"clip skip must be at least 1, got {clip_skip}")
        if clip_skip > 1 and not self.from_embeddings:
            raise SdrtError("CLIP skip needs a bundle exported by sdrt (this text encoder graph has no "
                            "per-layer states); re-export the checkpoint with `sdrt export`")
        if self.num_layers and clip_skip > self.num_layers:
            raise SdrtError(f"clip skip {clip_skip} exceeds the text encoder's {self.num_layers} layers")

    def encode_tokens(self, ids: np.ndarray, clip_skip: int = 1,
                      fixes: list[list[tuple[int, Embedding]]] | None = None) -> np.ndarray:
        """[n, 77] token ids -> [n, 77, hidden] states (CLIP skip n: layer -n, final norm applied).

        ``fixes[i]`` lists the embeddings whose vectors replace row i's token embeddings."""
        self.check_clip_skip(clip_skip)
        if not self.from_embeddings:
            if fixes and any(fixes):
                raise SdrtError("textual inversion embeddings need a bundle exported by sdrt (this text "
                                "encoder graph takes token ids); re-export the checkpoint with `sdrt export`")
            return _finite(np.concatenate([self.session.run({"input_ids": ids[i:i + ENCODE_BATCH]},
                                                            ["last_hidden_state"])["last_hidden_state"]
                                           for i in range(0, len(ids), ENCODE_BATCH)]), self.session)
        dtype = self.session.input_dtype("inputs_embeds")
        out = []
        for i in range(0, len(ids), ENCODE_BATCH):
            embeds = np.asarray(self.embeddings[ids[i:i + ENCODE_BATCH]], dtype=dtype)
            for row, row_fixes in enumerate((fixes or [])[i:i + ENCODE_BATCH]):
                for offset, embedding in row_fixes:
                    # +1: BOS comes first; the fixes' offsets count the 75 prompt tokens
                    embeds[row, 1 + offset:1 + offset + len(embedding.vectors)] = embedding.vectors
            if clip_skip == 1:
                out.append(self.session.run({"inputs_embeds": embeds}, ["last_hidden_state"])["last_hidden_state"])
            else:
                states = self.session.run({"inputs_embeds": embeds}, ["normed_hidden_states"])["normed_hidden_states"]
                out.append(states[len(states) - clip_skip])
        return _finite(np.concatenate(out), self.session)

    def _encode_batch(self, texts: list[str], clip_skip: int, min_chunks: int = 1):
        """The webui's ``forward`` over a batch of texts: {text: [77 * chunks, hidden]}, embeddings used.

        Every text is padded with empty chunks to the batch's longest; chunk i of all texts is
        encoded, and emphasis applied to it as the webui does: scale each token's state by its
        weight, then restore the mean the batch's chunk i had (one mean over the whole batch,
        duplicates counted). Each distinct text is encoded once."""
        counts = Counter(texts)
        unique = list(counts)
        chunked = [self.chunks(t) for t in unique]
        n = max(min_chunks, *(len(c) for c in chunked))
        if n > MAX_CHUNKS:
            raise SdrtError(f"the prompt needs {n} chunks of {CHUNK_LENGTH} tokens; sdrt takes at most {MAX_CHUNKS}")
        if n * len(unique) > MAX_ENCODED_CHUNKS:
            raise SdrtError(f"the prompt's edits and alternations need {len(unique)} texts of {n} chunks; "
                            f"sdrt encodes at most {MAX_ENCODED_CHUNKS} chunks per prompt")
        rows = [c + [self.empty_chunk() for _ in range(n - len(c))] for c in chunked]
        ids = np.array([[c.tokens for c in row] for row in rows], dtype=np.int64)  # [U, n, 77]
        mult = np.array([[c.multipliers for c in row] for row in rows], dtype=np.float32)
        u, t = len(unique), TEXT_TOKENS
        z = self.encode_tokens(ids.reshape(u * n, t), clip_skip, [c.fixes for row in rows for c in row])
        z = z.reshape(u, n, t, -1).astype(np.float32, copy=False)
        weight = np.array([counts[s] for s in unique], dtype=np.float64)
        for i in range(n):
            m = mult[:, i]
            if np.all(m == 1.0):
                continue
            original_mean = _batch_mean(z[:, i], weight)
            scaled = z[:, i] * m[..., None]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                z[:, i] = scaled * np.float32(original_mean / _batch_mean(scaled, weight))
        if not np.all(np.isfinite(z)):
            raise SdrtError("the prompt's emphasis weights make the conditioning infinite or NaN")
        used: dict[str, Embedding] = {}
        for i in range(n):
            for row in rows:
                for _, embedding in row[i].fixes:
                    used.setdefault(embedding.name, embedding)
        return {s: z[k].reshape(n * t, -1) for k, s in enumerate(unique)}, tuple(used.values())

    def encode(self, prompts: list[str], clip_skip: int = 1, min_chunks: int = 1) -> np.ndarray:
        """Texts (emphasis, ``BREAK`` and embeddings; no ``AND`` or edits) -> [len(prompts),
        77 * chunks, hidden] as the webui encodes them in one batch."""
        conds, _ = self._encode_batch(list(prompts), clip_skip, min_chunks)
        return np.stack([conds[p] for p in prompts])

    def schedule(self, entries: list[tuple[int, str]], clip_skip: int = 1) -> CondSchedule:
        """A prompt schedule ``[(end_at_step, text), ...]`` -> its conditioning, the texts encoded
        as one batch (as the webui's ``get_learned_conditioning``)."""
        conds, used = self._encode_batch([text for _, text in entries], clip_skip)
        return CondSchedule(tuple(end for end, _ in entries), tuple(conds[text] for _, text in entries), used)

    def conditioning(self, prompt: str, negative_prompt: str, steps: int, clip_skip: int = 1,
                     pad: bool = True) -> tuple[MultiCond, CondSchedule]:
        """(cond, uncond) for ``steps`` steps of the denoiser's step counter.

        ``AND`` parts shorter than the longest repeat their last vector (the webui's
        ``stack_conds``). With ``pad``, the shorter of cond and uncond is lengthened with empty
        chunks (the encoded empty prompt), so both go through the UNet in one batch (the webui's
        "Pad prompt/negative prompt to be same length"); without it they keep their lengths.
        Extra-network tags are cut out of the prompt first (``strip_extra_networks``)."""
        prompt = strip_extra_networks(prompt, negative_prompt)
        uncond = self.schedule(prompt_schedule(negative_prompt, steps), clip_skip)
        subprompts = split_and(prompt)
        if len(subprompts) > MAX_SUBPROMPTS:
            raise SdrtError(f"the prompt has {len(subprompts)} AND parts; sdrt takes at most {MAX_SUBPROMPTS}")
        by_text: dict[str, CondSchedule] = {}
        for text, _ in subprompts:
            if text not in by_text:
                by_text[text] = self.schedule(prompt_schedule(text, steps), clip_skip)
        longest = max(s.tokens for s in by_text.values())
        by_text = {text: s.extended(longest) for text, s in by_text.items()}
        if pad and longest != uncond.tokens:
            empty = self.encode([""], clip_skip)[0]
            if longest < uncond.tokens:
                by_text = {text: s.extended(uncond.tokens, empty) for text, s in by_text.items()}
            else:
                uncond = uncond.extended(longest, empty)
        return MultiCond(tuple((by_text[text], weight) for text, weight in subprompts)), uncond
