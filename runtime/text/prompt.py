"""The webui's prompt language, without lark: emphasis, BREAK, prompt editing, alternation and AND.

Three passes, in the order the webui applies them to a prompt:

1. ``split_and``: ``a AND b:0.5`` -> sub-prompts with weights (composable diffusion).
2. ``prompt_schedule``: each sub-prompt -> ``[(end_at_step, text), ...]`` for
   ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and ``[a|b]``.
3. ``parse_emphasis``: each scheduled text -> ``[(text, weight), ...]`` for ``(a)``, ``[a]``,
   ``(a:1.3)``, escapes, and ``BREAK`` as ``("BREAK", -1.0)``.

The results are those of the webui's ``modules/prompt_parser.py`` (its lark grammar with Earley
ambiguity resolution, its regular expressions), derived from reading it and checked against it
on tables and random strings; the parsers here are linear in the prompt's length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import SdrtError

ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]

# -- AND (composable diffusion) --

_AND = re.compile(r"\bAND\b")
_NUMBER_AFTER_COLON = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """``a AND b :0.5`` -> ``[("a", 1.0), (" b", 0.5)]``: the webui's ``get_multicond_prompt_list``.

    A trailing ``:number`` is the sub-prompt's weight; the text keeps its leading whitespace
    and loses its trailing whitespace, as the webui's lazy regular expression leaves them.
    """
    parts = []
    for sub in _AND.split(prompt):
        body = sub.rstrip()
        colon = body.rfind(":")
        if colon >= 0 and _NUMBER_AFTER_COLON.fullmatch(body[colon + 1:].lstrip()):
            parts.append((body[:colon].rstrip(), float(body[colon + 1:].lstrip())))
        else:
            parts.append((body, 1.0))
    return parts


# -- Emphasis --

_EMPHASIS_TOKENS = re.compile(r"""
      \\[()\[\]\\]?            # escape: \( \) \[ \] \\ give the character; a lone backslash gives nothing
    | [(\[]                    # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)   # ":1.3)" closes a round bracket with that weight
    | [)\]]                    # closing bracket
    | [^\\()\[\]:]+            # text
    | :                        # a colon that closes nothing
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


class _Weights:
    """A float64 array that grows; ranges are scaled in place (numpy's products are Python's)."""

    def __init__(self):
        self.data = np.ones(16)
        self.n = 0

    def append(self, w: float):
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.ones(len(self.data))])
        self.data[self.n] = w
        self.n += 1

    def scale(self, start: int, m: float):
        with np.errstate(over="ignore", invalid="ignore"):  # inf and nan, silently, as Python floats give them
            self.data[start:self.n] *= m


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Text and weight runs, as the webui's ``parse_prompt_attention``.

    ``(a)`` multiplies by 1.1, ``[a]`` divides by 1.1, ``(a:w)`` multiplies by w; brackets left
    open apply to the end of the prompt, closing brackets with nothing open are text. ``BREAK``
    becomes ``("BREAK", -1.0)`` (multiplied like any run when it stands inside brackets, and then
    no longer a break). Neighbouring runs of equal weight are merged.
    """
    texts: list[str] = []
    weights = _Weights()
    round_open: list[int] = []
    square_open: list[int] = []

    def add(t: str, w: float):
        texts.append(t)
        weights.append(w)

    for m in _EMPHASIS_TOKENS.finditer(text):
        token, weight = m.group(0), m.group(1)
        first = token[0]
        if first == "\\":
            add(token[1:], 1.0)
        elif first == "(":
            round_open.append(len(texts))
        elif first == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:
                # The webui fails the whole generation here (float() raises)
                raise SdrtError(f"cannot read the emphasis weight {weight!r} in the prompt") from None
            weights.scale(round_open.pop(), value)
        elif token == ")" and round_open:
            weights.scale(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            weights.scale(square_open.pop(), SQUARE_MULTIPLIER)
        elif "BREAK" in token:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    add("BREAK", -1.0)
                add(part, 1.0)
        else:
            add(token, 1.0)
    for start in round_open:
        weights.scale(start, ROUND_MULTIPLIER)
    for start in square_open:
        weights.scale(start, SQUARE_MULTIPLIER)
    if not texts:
        return [("", 1.0)]
    runs: list[tuple[str, float]] = []
    run_texts, run_weight = [texts[0]], float(weights.data[0])
    for t, w in zip(texts[1:], weights.data[1:weights.n].tolist()):
        if w == run_weight:
            run_texts.append(t)
        else:
            runs.append(("".join(run_texts), run_weight))
            run_texts, run_weight = [t], w
    runs.append(("".join(run_texts), run_weight))
    return runs


# -- Prompt editing and alternation --

# The number of an edit, as lark's SIGNED_NUMBER: sign, digits, one dot, an exponent
_EDIT_NUMBER = re.compile(r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)")
_SPECIAL = frozenset("\\[]():|")


class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    __slots__ = ("before", "after", "number", "when")

    def __init__(self, before, after, number: str):
        self.before, self.after, self.number, self.when = before, after, number, 0


class _Alternation:
    """``[a|b|...]``: option ``(step - 1) % n`` at each step."""

    __slots__ = ("options",)

    def __init__(self, options):
        self.options = options


class _ScheduleParser:
    """Recursive descent over the webui's grammar, evaluated right to left so that it never recurses.

    The grammar (``prompt_parser.schedule_parser``): a prompt is a sequence of plain text,
    ``(p)``, ``(p:p)``, ``[p]``, ``[p:p:N]``, ``[p:N]`` and ``[p|p|...]``; at the top level
    brackets and colons that close nothing are text. Inside a bracket only well-formed items may
    stand, so the item that starts at a bracket is unique: ``item[i]`` holds it (or None) for
    every bracket, computed from the last one to the first, each from the items after it.

    At the top level a complete item could also be read as text (brackets that close nothing).
    The webui's Earley parser takes the item, except where the item is directly followed by such
    a bracket or colon: there its choice changes from run to run with Python's hash seed. ``parse``
    always takes the item (docs/DIFFERENCES.md). Text with ``|`` outside an alternation, or a
    backslash that escapes nothing, does not parse; the webui then uses the prompt as it is, and
    so does this.
    """

    def __init__(self, text: str):
        self.text = text
        n = len(text)
        # plain_end[k]: where the plain run (text, escapes) that starts at k ends (k if none)
        self.plain_end = plain_end = list(range(n + 1))
        for k in range(n - 1, -1, -1):
            c = text[k]
            if c not in _SPECIAL:
                plain_end[k] = plain_end[k + 1]
            elif c == "\\" and k + 1 < n and text[k + 1] != "\n":
                plain_end[k] = plain_end[k + 2]
        self.item: dict[int, tuple | None] = {}
        for k in range(n - 1, -1, -1):
            if text[k] in "([":
                self.item[k] = self._item_at(k)

    def _sequence(self, k: int) -> tuple[list, int]:
        """The longest prompt (sequence of items) from k: (nodes, end)."""
        nodes = []
        text, n = self.text, len(self.text)
        while k < n:
            end = self.plain_end[k]
            if end > k:
                nodes.append(text[k:end])
                k = end
                continue
            found = self.item.get(k)
            if found is None:
                break
            nodes.append(found[0])
            k = found[1]
        return nodes, k

    def _number(self, k: int) -> tuple[str, int] | None:
        """``[WHITESPACE] NUMBER [WHITESPACE] "]"`` from k: (number, end after the bracket)."""
        text = self.text
        while k < len(text) and text[k].isspace():
            k += 1
        m = _EDIT_NUMBER.match(text, k)
        if not m:
            return None
        k = m.end()
        while k < len(text) and text[k].isspace():
            k += 1
        if k < len(text) and text[k] == "]":
            return m.group(0), k + 1
        return None

    def _item_at(self, k: int) -> tuple | None:
        text, n = self.text, len(self.text)
        first, k1 = self._sequence(k + 1)
        c = text[k1] if k1 < n else ""
        if text[k] == "(":
            if c == ")":
                return ("(", first, ")"), k1 + 1
            if c == ":":
                second, k2 = self._sequence(k1 + 1)
                if k2 < n and text[k2] == ")":
                    return ("(", first, ":", second, ")"), k2 + 1
            return None
        if c == "]":
            return ("[", first, "]"), k1 + 1
        if c == ":":
            number = self._number(k1 + 1)
            if number is not None:  # [after:when]
                return _Edit(None, first, number[0]), number[1]
            second, k2 = self._sequence(k1 + 1)
            if k2 < n and text[k2] == ":":
                number = self._number(k2 + 1)
                if number is not None:  # [before:after:when]
                    return _Edit(first, second, number[0]), number[1]
            return None
        if c == "|":
            options = [first]
            while k1 < n and text[k1] == "|":
                option, k1 = self._sequence(k1 + 1)
                options.append(option)
            if k1 < n and text[k1] == "]":
                return _Alternation(options), k1 + 1
        return None

    def parse(self) -> list | None:
        """The top level: items, text, and brackets or colons that close nothing; None if no parse."""
        text, n = self.text, len(self.text)
        nodes, k = [], 0
        while k < n:
            nodes_k, end = self._sequence(k)
            nodes += nodes_k
            k = end
            if k < n:
                if text[k] not in "[]():":
                    return None  # "|" outside an alternation, or a backslash that escapes nothing
                nodes.append(text[k])
                k += 1
        return nodes


def _walk(nodes: list):
    """Every node of the tree, branches not taken included (iteratively: prompts nest deep)."""
    stack = [nodes]
    while stack:
        top = stack.pop()
        if isinstance(top, list):
            stack.extend(top)
        elif isinstance(top, tuple):
            stack.extend(part for part in top if isinstance(part, list))
        elif isinstance(top, _Edit):
            yield top
            stack.append(top.after)
            if top.before is not None:
                stack.append(top.before)
        elif isinstance(top, _Alternation):
            yield top
            stack.extend(top.options)


def _text_at(nodes: list, step: int) -> str:
    out: list[str] = []
    stack: list = [nodes]
    while stack:
        top = stack.pop()
        if isinstance(top, str):
            out.append(top)
        elif isinstance(top, list):
            stack.extend(reversed(top))
        elif isinstance(top, tuple):
            stack.extend(reversed(top))
        elif isinstance(top, _Edit):
            branch = top.before if step <= top.when else top.after
            if branch is not None:
                stack.append(branch)
        else:
            stack.append(top.options[(step - 1) % len(top.options)])
    return "".join(out)


def _edit_step(number: str, steps: int) -> int:
    """The webui's step of an edit: a number with a dot is a fraction of the steps, else a step."""
    v = float(number)
    if "." in number:
        v *= steps
    if v != v or abs(v) == float("inf"):
        # int() raises on these in the webui; past either end of the steps is where they point
        return steps if v > 0 else -1
    return min(steps, int(v))


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]`` as the webui's ``get_learned_conditioning_prompt_schedules``.

    The text of entry i is used while the sampler's step counter is at most its end step.
    ``[from:to:when]``: ``from`` until step ``when``, then ``to``; ``when`` with a dot is a
    fraction of ``steps`` (``0.5``), without one a step number (``10``). ``[a|b]`` alternates
    every step. A prompt that does not parse is used as it is.
    """
    if steps < 1:
        raise SdrtError(f"steps must be at least 1, got {steps}")
    if not any(c in prompt for c in "[]"):
        return [(steps, prompt)]  # no edit nor alternation can stand in it
    tree = _ScheduleParser(prompt).parse()
    if tree is None:
        return [(steps, prompt)]
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            node.when = _edit_step(node.number, steps)
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))
    return [(t, _text_at(tree, t)) for t in sorted(ends)]


@dataclass(frozen=True)
class SubPrompt:
    """One ``AND`` part of a prompt: its weight and its schedule of texts."""

    text: str
    weight: float
    schedule: tuple[tuple[int, str], ...]


def parse_prompt(prompt: str, steps: int) -> list[SubPrompt]:
    """A positive prompt: ``AND`` parts, each with its prompt-editing schedule over ``steps``."""
    return [SubPrompt(text, weight, tuple(prompt_schedule(text, steps))) for text, weight in split_and(prompt)]
