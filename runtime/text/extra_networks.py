"""Extra-network tags in prompts (``<lora:name:0.8>``, ``<hypernet:name>``), as the webui reads them.

The webui (``modules/extra_networks.py``, ``parse_prompt``) cuts every ``<type:args>`` tag out of
the prompt with one regular expression before anything else parses it, so the tags never reach
CLIP, whatever brackets (prompt editing, alternation, emphasis) or ``AND`` parts they stand in:
``a [<lora:x:1>:b:0.5]`` is encoded as ``a [:b:0.5]``, and the network applies to every step.
Tags of unknown types (``<foo:bar>``) are cut out too; the webui then skips them. A tag's
arguments are split at ``:``; an argument with a single ``=`` is named (``te=0.8``), the others
are positional (the webui's ``ExtraNetworkParams``).

Only the positive prompt is read so: the webui leaves tags in the negative prompt, where CLIP
encodes them as text. ``<lora:...>`` (and ``<lyco:...>``) tags are applied by the pipeline
(``runtime/networks/apply.py``: merged weights), ``<hypernet:...>`` tags too
(``runtime/networks/hypernet.py``: nodes in the UNet graph); docs/NETWORKS.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sdrt.runtime.errors import SdrtError

# The webui's registered types: lora (its Lora extension, with lyco an alias) and hypernet
NETWORK_TYPES = ("lora", "lyco", "hypernet")
LORA_TYPES = ("lora", "lyco")  # merged into the weights by runtime/networks/apply.py

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<type:arg:arg...>`` tag."""

    type: str
    items: tuple[str, ...]  # the arguments as written, split at ":"
    positional: tuple[str, ...] = field(init=False)
    named: dict[str, str] = field(init=False, hash=False)

    def __post_init__(self):
        positional, named = [], {}
        for item in self.items:
            parts = item.split("=")
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        object.__setattr__(self, "positional", tuple(positional))
        object.__setattr__(self, "named", named)

    @property
    def name(self) -> str:
        return self.positional[0] if self.positional else ""

    @property
    def known(self) -> bool:
        return self.type in NETWORK_TYPES

    @property
    def tag(self) -> str:
        return f"<{self.type}:{':'.join(self.items)}>"

    def multipliers(self) -> tuple[float, float]:
        """(text encoder, UNet) multipliers, as the webui's Lora extension reads them.

        ``<lora:name:te:unet>``, ``te=`` and ``unet=`` overriding the positional ones; the UNet's
        defaults to the text encoder's, and that to 1 (a hypernet's one multiplier is the first)."""
        te = self._number(self.named.get("te", self.positional[1] if len(self.positional) > 1 else 1.0))
        unet = self._number(self.named.get("unet", self.positional[2] if len(self.positional) > 2 else te))
        return te, unet

    def _number(self, value) -> float:
        try:
            return float(value)
        except ValueError:
            raise SdrtError(f"cannot read the multiplier {value!r} of {self.tag} in the prompt") from None


def parse_prompt(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt without its extra-network tags, and the tags in the order they stand."""
    networks: list[ExtraNetwork] = []

    def cut(m: re.Match) -> str:
        networks.append(ExtraNetwork(m.group(1), tuple(m.group(2).split(":"))))
        return ""

    # Every tag ends at a ">": searching no further than the last one keeps this linear in the
    # prompt's length (past it, each "<name:" would scan to the end in vain).
    end = prompt.rfind(">") + 1
    return _TAG.sub(cut, prompt[:end]) + prompt[end:], networks

