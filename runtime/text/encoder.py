"""Prompt text -> conditioning, as the webui builds it (``sd_hijack_clip.py``, ``prompt_parser.py``).

A prompt's ``AND`` parts each get a schedule of texts (prompt editing, alternation); each text is
parsed for emphasis, tokenized run by run, split into 77-token chunks (75 tokens between BOS and
EOS, with the webui's comma back-off and ``BREAK``), textual inversion names replaced by their
vectors, and encoded chunk by chunk. Token embeddings are looked up here and fed to the graph's
``inputs_embeds``, which is what makes embeddings and weighting free at run time.

Each text encoder behaves as the webui's embedder class for its family (``_FAMILIES``: OpenCLIP's
padding with id 0 and open_clip's tokenizer clean-up, the layer read, the pooled projection);
``SDXLConditioner`` drives SDXL's two encoders as sgm's ``GeneralConditioner`` and adds the size
conditioning (docs/SDXL.md).
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
    # SDXL's "vector" conditioning beside the cross-attention one: each entry's pooled text
    # embedding ([projection]) and the request's size conditioning ([6]; the refiner's [5])
    pooled: tuple[np.ndarray, ...] | None = None
    time_ids: np.ndarray | None = None

    def index(self, step: int) -> int:
        for i, end in enumerate(self.ends):
            if step <= end:
                return i
        return 0  # past the last end the webui falls back to the first entry

    def at(self, step: int) -> np.ndarray:
        return self.conds[self.index(step)]

    def added_at(self, step: int) -> dict[str, np.ndarray] | None:
        """The UNet's added conditioning at ``step`` (SDXL's ``text_embeds`` and ``time_ids``), or None."""
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled[self.index(step)], "time_ids": self.time_ids}

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

    def added_at(self, step: int) -> list[dict[str, np.ndarray] | None]:
        return [schedule.added_at(step) for schedule, _ in self.parts]

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
    """The prompt without its extra-network tags (``<lora:name:0.8>``, ``<hypernet:name:0.5>``), which
    the pipeline applies (runtime/networks); tags of unknown types, which the webui skips too, are
    named in a warning. Tags in the negative prompt stay text, as in the webui."""
    text, networks = parse_extra_networks(prompt)
    skipped = [n for n in networks if not n.known]
    if skipped:
        log.warning("extra networks of unknown types are not applied; removed from the prompt: %s",
                    ", ".join(n.tag for n in skipped))
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


# How each text encoder's states become conditioning, by (architecture, component): the webui's
# embedder classes (sd_hijack_clip.py, sd_hijack_open_clip.py).
#   layer: "clip_skip" (FrozenCLIPEmbedderWithCustomWords: layer -n with the final norm),
#          "last" (FrozenOpenCLIPEmbedderWithCustomWords: ldm's "penultimate" layer, which the
#          exported 23-layer tower gives as its last_hidden_state; CLIP skip is not applied),
#          "penultimate" (SDXL's two embedders: the raw output of the second-to-last layer)
#   openclip: open_clip's tokenizer and its padding with id 0 after the first end token
#   pooled: the pooled projection of the first chunk (SDXL's FrozenOpenCLIPEmbedder2)
_FAMILIES = {
    ("sd2", "text_encoder"): ("last", True, False),
    ("sdxl", "text_encoder"): ("penultimate", False, False),
    ("sdxl", "text_encoder_2"): ("penultimate", True, True),
    ("sdxl-refiner", "text_encoder_2"): ("penultimate", True, True),
}
OPENCLIP_PAD = 0  # the webui's id_pad for OpenCLIP encoders
# The webui's defaults of its SDXL options (sdxl_crop_top / sdxl_crop_left, the refiner's
# sdxl_refiner_high_aesthetic_score / sdxl_refiner_low_aesthetic_score)
SDXL_CROP = (0, 0)
REFINER_AESTHETIC = (6.0, 2.5)  # positive prompt, negative prompt


def _info(bundle: Bundle, component: str) -> dict:
    if component == "text_encoder":
        return bundle.text_encoder
    info = getattr(bundle.schema, component, None)
    if info is None:
        raise SdrtError(f"bundle {bundle.path} has no {component} description in its sdrt.json")
    return info.to_json() if hasattr(info, "to_json") else dict(info)


class _Conditioner:
    """Prompt schedules, ``AND`` parts and CFG padding over ``_encode_batch``, the part that differs
    between SD 1.x/2.x's one text encoder and SDXL's two (``prompt_parser.get_learned_conditioning``
    and ``get_multicond_learned_conditioning``)."""

    zero_empty_negative = False  # SDXL: an all-empty negative prompt is zeros (force_zero_embeddings)

    def _encode_batch(self, texts: list[str], clip_skip: int, min_chunks: int = 1):
        """{text: [77 * chunks, width]}, {text: pooled} or None, the embeddings used."""
        raise NotImplementedError

    def time_ids(self, width: int | None, height: int | None, negative: bool, crop: tuple[int, int] = SDXL_CROP,
                 aesthetic: tuple[float, float] = REFINER_AESTHETIC) -> np.ndarray | None:
        return None

    def encode(self, prompts: list[str], clip_skip: int = 1, min_chunks: int = 1) -> np.ndarray:
        """Texts (emphasis, ``BREAK`` and embeddings; no ``AND`` or edits) -> [len(prompts),
        77 * chunks, width] as the webui encodes them in one batch."""
        conds, _, _ = self._encode_batch(list(prompts), clip_skip, min_chunks)
        return np.stack([conds[p] for p in prompts])

    def schedule(self, entries: list[tuple[int, str]], clip_skip: int = 1, *, width: int | None = None,
                 height: int | None = None, negative: bool = False, crop: tuple[int, int] = SDXL_CROP,
                 aesthetic: tuple[float, float] = REFINER_AESTHETIC) -> CondSchedule:
        """A prompt schedule ``[(end_at_step, text), ...]`` -> its conditioning, the texts encoded
        as one batch (as the webui's ``get_learned_conditioning``)."""
        texts = [text for _, text in entries]
        conds, pooled, used = self._encode_batch(texts, clip_skip)
        ends = tuple(end for end, _ in entries)
        if pooled is None:
            return CondSchedule(ends, tuple(conds[t] for t in texts), used)
        if negative and self.zero_empty_negative and all(t == "" for t in texts):
            # sd_models_xl.get_learned_conditioning: force_zero_embeddings=['txt'] zeroes both
            # encoders' outputs, the cross-attention states and the pooled vector
            conds = {t: np.zeros_like(c) for t, c in conds.items()}
            pooled = {t: np.zeros_like(v) for t, v in pooled.items()}
        return CondSchedule(ends, tuple(conds[t] for t in texts), used, pooled=tuple(pooled[t] for t in texts),
                            time_ids=self.time_ids(width, height, negative, crop, aesthetic))

    def conditioning(self, prompt: str, negative_prompt: str, steps: int, clip_skip: int = 1,
                     pad: bool = True, *, width: int | None = None, height: int | None = None,
                     crop: tuple[int, int] = SDXL_CROP,
                     aesthetic: tuple[float, float] = REFINER_AESTHETIC) -> tuple[MultiCond, CondSchedule]:
        """(cond, uncond) for ``steps`` steps of the denoiser's step counter.

        ``AND`` parts shorter than the longest repeat their last vector (the webui's
        ``stack_conds``). With ``pad``, the shorter of cond and uncond is lengthened with empty
        chunks (the encoded empty prompt), so both go through the UNet in one batch (the webui's
        "Pad prompt/negative prompt to be same length"); without it they keep their lengths.
        Extra-network tags are cut out of the prompt first (``strip_extra_networks``). ``width``
        and ``height`` (the image's), ``crop`` (top, left) and the refiner's ``aesthetic`` scores
        (prompt, negative prompt) are SDXL's added conditioning (the webui's ``sdxl_crop_top``,
        ``sdxl_crop_left``, ``sdxl_refiner_high_aesthetic_score``, ``..._low_...`` settings)."""
        prompt = strip_extra_networks(prompt, negative_prompt)
        size = {"width": width, "height": height, "crop": crop, "aesthetic": aesthetic}
        uncond = self.schedule(prompt_schedule(negative_prompt, steps), clip_skip, negative=True, **size)
        subprompts = split_and(prompt)
        if len(subprompts) > MAX_SUBPROMPTS:
            raise SdrtError(f"the prompt has {len(subprompts)} AND parts; sdrt takes at most {MAX_SUBPROMPTS}")
        by_text: dict[str, CondSchedule] = {}
        for text, _ in subprompts:
            if text not in by_text:
                by_text[text] = self.schedule(prompt_schedule(text, steps), clip_skip, **size)
        longest = max(s.tokens for s in by_text.values())
        by_text = {text: s.extended(longest) for text, s in by_text.items()}
        if pad and longest != uncond.tokens:
            # The webui's cond_stage_model_empty_prompt: the encoded "" (not zeroed, also for SDXL)
            empty = self.encode([""], clip_skip)[0]
            if longest < uncond.tokens:
                by_text = {text: s.extended(uncond.tokens, empty) for text, s in by_text.items()}
            else:
                uncond = uncond.extended(longest, empty)
        return MultiCond(tuple((by_text[text], weight) for text, weight in subprompts)), uncond


class TextEncoder(_Conditioner):
    """One of the bundle's text encoders; token embeddings looked up here for sdrt bundles.

    ``component``: ``text_encoder`` or (SDXL) ``text_encoder_2``; the bundle's architecture picks
    the webui embedder it behaves as (``_FAMILIES``; SD 1.x otherwise)."""

    def __init__(self, bundle: Bundle, device: str = "cpu", tokenizer: ClipTokenizer | None = None,
                 embeddings_dir: str | Path | list | None = None, precision: str = "fp32", *,
                 component: str = "text_encoder", embedding_key: str | None = None):
        self.bundle = bundle
        self.component = component
        self.session = open_component(bundle, component, device, precision)
        tok_dir = bundle.path / "tokenizer"
        self.tokenizer = tokenizer or (ClipTokenizer.from_dir(tok_dir) if (tok_dir / "vocab.json").exists()
                                       else ClipTokenizer.default())
        info = _info(bundle, component)
        self.bos, self.eos = info["bos_token_id"], info["eos_token_id"]
        self.layer, self.openclip, self.pooled = _FAMILIES.get((bundle.architecture, component),
                                                               ("clip_skip", False, False))
        pad = info.get("pad_token_id")
        self.pad = (pad if pad is not None else OPENCLIP_PAD) if self.openclip else self.eos
        self.comma = self.tokenizer.token_to_id(",</w>")
        self.from_embeddings = "inputs_embeds" in self.session.inputs
        self.num_layers = info.get("num_layers")
        self.embeddings = None
        if self.from_embeddings:
            table = bundle.path / info["token_embeddings"]
            if not table.exists():
                raise SdrtError(f"bundle {bundle.path} is incomplete: missing {info['token_embeddings']}")
            self.embeddings = np.load(table, mmap_mode="r")
        self.projection = None
        if self.pooled and info.get("projection"):
            path = bundle.path / info["projection"]
            if not path.exists():
                raise SdrtError(f"bundle {bundle.path} is incomplete: missing {info['projection']}")
            self.projection = np.load(path).astype(np.float32)
        self.library = None
        if embeddings_dir is not None:
            width = self.embeddings.shape[1] if self.embeddings is not None else None
            self.library = EmbeddingLibrary(embeddings_dir, self.tokenizer, width, key=embedding_key)

    @property
    def loaded(self) -> bool:
        return self.session.loaded

    def release(self) -> None:
        self.session.release()

    def chunks(self, text: str) -> list[Chunk]:
        """One prompt text (no ``AND``, no edits left) -> its chunks, emphasis and embeddings in."""
        runs = parse_emphasis(text)
        ids = self.tokenizer.encode_batch([t for t, _ in runs], html_unescape=self.openclip)
        pieces = [(None if (t == "BREAK" and w == -1) else tokens, w) for (t, w), tokens in zip(runs, ids)]
        return make_chunks(pieces, bos=self.bos, eos=self.eos, comma=self.comma, embeddings=self.library)

    def empty_chunk(self) -> Chunk:
        return Chunk([self.bos] + [self.eos] * (TEXT_TOKENS - 1), [1.0] * TEXT_TOKENS)

    def check_clip_skip(self, clip_skip: int) -> None:
        """One-line errors for a CLIP skip this text encoder cannot give; a warning where the
        webui ignores it (OpenCLIP and SDXL encoders)."""
        if clip_skip < 1:
            raise SdrtError(f"clip skip must be at least 1, got {clip_skip}")
        if self.layer != "clip_skip":
            if clip_skip > 1:
                log.warning("clip skip %d is ignored for %s models, as in the webui (its OpenCLIP and SDXL "
                            "encoders read a fixed layer)", clip_skip, self.bundle.architecture)
            return
        if clip_skip > 1 and not self.from_embeddings:
            raise SdrtError("CLIP skip needs a bundle exported by sdrt (this text encoder graph has no "
                            "per-layer states); re-export the checkpoint with `sdrt export`")
        if self.num_layers and clip_skip > self.num_layers:
            raise SdrtError(f"clip skip {clip_skip} exceeds the text encoder's {self.num_layers} layers")

    def padded_ids(self, ids: np.ndarray) -> np.ndarray:
        """OpenCLIP encoders: every id after a row's first end token set to the pad id 0
        (``FrozenCLIPEmbedderWithCustomWordsBase.process_tokens``); SD 1.x pads with the end token."""
        if self.pad == self.eos:
            return ids
        ids = ids.copy()
        for row in ids:
            ends = np.flatnonzero(row == self.eos)
            if len(ends):
                row[ends[0] + 1:] = self.pad
        return ids

    def _outputs(self, clip_skip: int) -> list[str]:
        """The graph outputs that hold the states this encoder reads (and, pooled, the last state)."""
        if self.layer == "penultimate":
            names = self.session.outputs
            if "hidden_states" in names:  # sdrt's graphs: [layers, batch, 77, width], raw
                z = "hidden_states"
            elif self.num_layers and f"hidden_states.{self.num_layers - 1}" in names:  # optimum's
                z = f"hidden_states.{self.num_layers - 1}"
            else:
                raise SdrtError(f"the {self.component} graph has no per-layer hidden states (SDXL reads the "
                                "penultimate layer); re-export the checkpoint with `sdrt export`")
        elif self.layer == "clip_skip" and clip_skip > 1:
            z = "normed_hidden_states"
        else:
            z = "last_hidden_state"
        if self.pooled and self.projection is None and "text_embeds" in self.session.outputs:
            return [z, "text_embeds"]  # optimum's CLIPTextModelWithProjection: the projected pooled output
        return [z, "last_hidden_state"] if self.pooled and z != "last_hidden_state" else [z]

    def _select(self, out: dict[str, np.ndarray], name: str, clip_skip: int) -> np.ndarray:
        states = out[name]
        if name == "hidden_states":
            return states[len(states) - 2]
        if name == "normed_hidden_states":
            return states[len(states) - clip_skip]
        return states

    def _pool(self, last: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The pooled text embedding: the final-normed state at each row's first end token times
        the text projection (sgm ``FrozenOpenCLIPEmbedder2.pool``: ``argmax`` of the ids, which
        is the first end token once the rest is padded with 0)."""
        if self.projection is None:
            raise SdrtError(f"bundle {self.bundle.path} has no text projection for {self.component} "
                            "(sdrt.json's projection); re-export the checkpoint with `sdrt export`")
        first = np.argmax(ids == self.eos, axis=1)
        return last[np.arange(len(ids)), first].astype(np.float32) @ self.projection

    def encode_tokens(self, ids: np.ndarray, clip_skip: int = 1,
                      fixes: list[list[tuple[int, Embedding]]] | None = None) -> np.ndarray:
        """[n, 77] token ids -> [n, 77, hidden] states (SD 1.x CLIP skip n: layer -n, final norm
        applied; the others: their family's layer).

        ``fixes[i]`` lists the embeddings whose vectors replace row i's token embeddings."""
        return self.encode_states(ids, clip_skip, fixes)[0]

    def encode_states(self, ids: np.ndarray, clip_skip: int = 1,
                      fixes: list[list[tuple[int, Embedding]]] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``encode_tokens`` and, for the pooled encoder, each row's pooled vector [n, projection]."""
        self.check_clip_skip(clip_skip)
        ids = self.padded_ids(ids)
        names = self._outputs(clip_skip)
        out, pooled = [], []
        for i in range(0, len(ids), ENCODE_BATCH):
            batch = ids[i:i + ENCODE_BATCH]
            if not self.from_embeddings:
                if fixes and any(fixes):
                    raise SdrtError("textual inversion embeddings need a bundle exported by sdrt (this text "
                                    "encoder graph takes token ids); re-export the checkpoint with `sdrt export`")
                result = self.session.run({"input_ids": batch}, names)
            else:
                embeds = np.asarray(self.embeddings[batch], dtype=self.session.input_dtype("inputs_embeds"))
                for row, row_fixes in enumerate((fixes or [])[i:i + ENCODE_BATCH]):
                    for offset, embedding in row_fixes:
                        # +1: BOS comes first; the fixes' offsets count the 75 prompt tokens
                        embeds[row, 1 + offset:1 + offset + len(embedding.vectors)] = embedding.vectors
                result = self.session.run({"inputs_embeds": embeds}, names)
            out.append(self._select(result, names[0], clip_skip))
            if self.pooled:
                pooled.append(result["text_embeds"].astype(np.float32) if "text_embeds" in names
                              else self._pool(result["last_hidden_state"], batch))
        z = _finite(np.concatenate(out), self.session)
        return z, (_finite(np.concatenate(pooled), self.session) if self.pooled else None)

    def _encode_batch(self, texts: list[str], clip_skip: int, min_chunks: int = 1):
        """The webui's ``forward`` over a batch of texts: {text: [77 * chunks, hidden]}, {text:
        pooled} (or None), embeddings used.

        Every text is padded with empty chunks to the batch's longest; chunk i of all texts is
        encoded, and emphasis applied to it as the webui does: scale each token's state by its
        weight, then restore the mean the batch's chunk i had (one mean over the whole batch,
        duplicates counted). The pooled vector is the first chunk's, without emphasis. Each
        distinct text is encoded once."""
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
        fixes = [c.fixes for row in rows for c in row]
        if self.pooled:
            z, pooled = self.encode_states(ids.reshape(u * n, t), clip_skip, fixes)
            pooled = pooled.reshape(u, n, -1)[:, 0]
        else:
            z, pooled = self.encode_tokens(ids.reshape(u * n, t), clip_skip, fixes), None
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
        conds = {s: z[k].reshape(n * t, -1) for k, s in enumerate(unique)}
        return conds, (None if pooled is None else {s: pooled[k] for k, s in enumerate(unique)}), tuple(used.values())


class SDXLConditioner(_Conditioner):
    """SDXL's conditioning (sgm ``GeneralConditioner`` as the webui drives it): CLIP ViT-L and
    OpenCLIP ViT-bigG each chunk, weight and mean-restore the prompt on their own; the states are
    concatenated per token, the pooled vector is bigG's, and the size conditioning (``time_ids``:
    original size, crop top-left, target size) comes from the image's size (``sd_models_xl``).
    The refiner has bigG only and conditions on size, crop and an aesthetic score instead."""

    zero_empty_negative = True

    def __init__(self, bundle: Bundle, device: str = "cpu", tokenizer: ClipTokenizer | None = None,
                 embeddings_dir: str | Path | list | None = None, precision: str = "fp32"):
        self.bundle = bundle
        self.refiner = bundle.architecture == "sdxl-refiner"
        names = ["text_encoder_2"] if self.refiner else ["text_encoder", "text_encoder_2"]
        # The webui's textual_inversion_key per embedder: SDXL embedding files hold clip_l and clip_g
        keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
        self.encoders = [TextEncoder(bundle, device, tokenizer, embeddings_dir, precision, component=name,
                                     embedding_key=keys[name]) for name in names]
        self.tokenizer = self.encoders[0].tokenizer
        self.library = self.encoders[0].library

    @property
    def session(self) -> Backend:
        return self.encoders[0].session

    @property
    def loaded(self) -> bool:
        return any(e.loaded for e in self.encoders)

    def release(self) -> None:
        for e in self.encoders:
            e.release()

    def check_clip_skip(self, clip_skip: int) -> None:
        self.encoders[0].check_clip_skip(clip_skip)

    def time_ids(self, width: int | None, height: int | None, negative: bool, crop: tuple[int, int] = SDXL_CROP,
                 aesthetic: tuple[float, float] = REFINER_AESTHETIC) -> np.ndarray:
        # The webui's get_learned_conditioning: width and height default to 1024
        w, h = width or 1024, height or 1024
        top, left = crop
        if self.refiner:
            return np.array([h, w, top, left, aesthetic[1 if negative else 0]], dtype=np.float32)
        return np.array([h, w, top, left, h, w], dtype=np.float32)

    def _encode_batch(self, texts: list[str], clip_skip: int, min_chunks: int = 1):
        results = [e._encode_batch(texts, clip_skip, min_chunks) for e in self.encoders]
        conds = {}
        for text in results[0][0]:
            parts = [r[0][text] for r in results]
            if len({len(p) for p in parts}) > 1:
                # The webui fails here (torch.cat of unequal lengths); the two tokenizers' clean-ups
                # differ only in HTML entities and ftfy's fixes
                raise SdrtError(f"SDXL's two text encoders split the prompt into different numbers of chunks "
                                f"({', '.join(str(len(p) // TEXT_TOKENS) for p in parts)}): {text[:60]!r}")
            conds[text] = np.concatenate(parts, axis=-1)
        # Each embedder records its embeddings before those already recorded (TI hashes)
        used = tuple(e for r in reversed(results) for e in r[2])
        return conds, results[-1][1], used


def make_text_encoder(bundle: Bundle, device: str = "cpu", embeddings_dir: str | Path | list | None = None,
                      precision: str = "fp32") -> TextEncoder | SDXLConditioner:
    """The bundle's text conditioning: SDXL's two encoders (the refiner's one) or the single one."""
    if bundle.architecture in ("sdxl", "sdxl-refiner"):
        return SDXLConditioner(bundle, device, embeddings_dir=embeddings_dir, precision=precision)
    return TextEncoder(bundle, device, embeddings_dir=embeddings_dir, precision=precision)
