"""``<lora:...>`` tags -> merged weights in the text encoder and UNet sessions, without re-export.

Names resolve in the LoRA folders as the webui's ``networks.list_available_networks`` resolves
them: every ``.safetensors`` / ``.pt`` / ``.ckpt`` under the folders (subfolders included) by its
file stem, and by its alias, the ``ss_output_name`` of its metadata (an alias two files share
resolves to neither). Each file's keys are read as the webui's ``networks.load_network`` reads
them: the layer name before the first ``.`` (kohya / webui ``lora_unet_*`` / ``lora_te_*``, in
the LDM or the diffusers module naming), or diffusers / PEFT dotted names (``unet.<module>``,
``text_encoder.<module>``) before ``lora_A`` / ``lora_B``; the rest names the module's weights.

Layer names map to the bundle's weights through its provenance: the webui's names are built from
the LDM key of each source weight (``diffusion_model_input_blocks_1_1_proj_in``,
``transformer_text_model_encoder_layers_0_self_attn_q_proj``) and from the diffusers one
(``lora_unet_down_blocks_0_attentions_0_proj_in``, ``lora_te_text_model_...``), and the merged
weight goes into every initializer that holds that source weight, in its layout there.

Merged weights are cached per graph and network set (file contents by sha256, multipliers): a
generation with the set in place changes nothing, and switching back to a recent set only makes
the sessions again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.networks import files, hypernet, lora, provenance, quantized
from sdrt.runtime.networks.onnx_weights import GraphWeights
from sdrt.runtime.text.extra_networks import ExtraNetwork, parse_prompt

log = logging.getLogger(__name__)

DEFAULT_LORA_DIR = Path("models/Lora")
CACHE_SETS = 2  # merged weight sets kept per graph (the one in place and the one before)
PARSED_FILES = 4  # network files kept read (a set's files serve the text encoder and the UNet)
_SHOWN = 5  # keys a warning names

# Which bundle component each layer-name prefix targets, and which multiplier it takes: SDXL's
# kohya files name CLIP ViT-L "lora_te1_" and OpenCLIP bigG "lora_te2_", both by their transformers
# modules (the exporter's text_encoder / text_encoder_2), and diffusers' dotted names
# "text_encoder_2." (docs/NETWORKS.md)
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2"}
DOTTED = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
TE_COMPONENTS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# LDM key prefix -> the webui's layer-name prefix (``assign_network_names_to_compvis_modules``
# names the modules of ``sd_model.model`` and ``cond_stage_model.wrapped``)
LDM_LAYER_PREFIXES = {"model.": "", "cond_stage_model.": ""}


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def layer_names(component: str, prov: provenance.Provenance) -> dict[str, str]:
    """Every layer name a network file may use for a module of ``component`` -> the module's
    diffusers name (its weights' keys without ``.weight`` / ``.bias``)."""
    out: dict[str, str] = {}
    prefixes = [p for p, c in PREFIXES.items() if c == component]
    # An LDM module holding several diffusers modules' weights (OpenCLIP's fused in_proj: q, k, v)
    # names none of them
    owners: dict[str, set] = {}
    for key, (_, ldm) in prov.sources.items():
        if ldm:
            owners.setdefault(_module_of(ldm), set()).add(_module_of(key))
    for key, (_, ldm) in prov.sources.items():
        module = _module_of(key)
        for prefix in prefixes:
            out[prefix + module.replace(".", "_")] = module
        if ldm and len(owners[_module_of(ldm)]) == 1:
            ldm_module = _module_of(ldm)
            for strip, keep in LDM_LAYER_PREFIXES.items():
                if ldm_module.startswith(strip):
                    webui = (keep + ldm_module[len(strip):]).replace(".", "_")
                    out[webui] = module
                    if webui.startswith("diffusion_model_"):  # the webui: "lora_unet" -> "diffusion_model"
                        out["lora_unet_" + webui[len("diffusion_model_"):]] = module
    return out


def split_key(key: str) -> tuple[str, str]:
    """(layer name, weight part) of a network file's key, as the webui's ``load_network`` splits it."""
    parts = key.split(".")
    if parts[0] in DOTTED and len(parts) > 3:  # diffusers / PEFT: unet.<module>.lora_A.weight
        for i in range(len(parts) - 1, 0, -1):
            if parts[i] in ("lora_A", "lora_B", "lora_up", "lora_down", "alpha"):
                return ".".join(parts[:i]), ".".join(parts[i:])
    layer, _, part = key.partition(".")
    return layer, part


@dataclass
class ParsedNetwork:
    """A network file's modules by (component, diffusers module), and the keys that matched nothing."""

    path: Path
    modules: dict[tuple[str, str], lora.Module]
    unmatched: list[str]


def parse_network(path: Path, tensors: dict[str, np.ndarray],
                  names: dict[str, dict[str, str]]) -> ParsedNetwork:
    """Group a file's tensors by target layer and pick each layer's module type."""
    grouped: dict[tuple[str, str], dict] = {}
    first: dict[tuple[str, str], str] = {}
    unmatched = []
    modules_of = {component: set(table.values()) for component, table in names.items()}
    for key, value in tensors.items():
        layer, part = split_key(key)
        target = None
        head = layer.split(".", 1)[0]
        if head in DOTTED and "." in layer:
            component, module = DOTTED[head], layer.split(".", 1)[1]
            if module in modules_of.get(component, ()):
                target = (component, module)
        else:
            for component, table in names.items():
                if layer in table:
                    target = (component, table[layer])
                    break
        if target is None or not part:
            unmatched.append(key)
            continue
        grouped.setdefault(target, {})[part] = value
        first.setdefault(target, key)
    modules = {}
    for target, w in grouped.items():
        kind = lora.module_kind(w)
        if kind is None:
            raise SdrtError(f"{path}: {first[target]}: no LoRA / LyCORIS module type reads the weights "
                            f"{', '.join(sorted(w))} (OFT and GLoRA are not supported)")
        modules[target] = lora.Module(kind, first[target], w)
    return ParsedNetwork(path, modules, unmatched)


# -- finding files by name --

@dataclass(frozen=True)
class NetworkFile:
    name: str  # the file stem
    path: Path
    alias: str

    @property
    def metadata(self) -> dict[str, str]:
        return files.safetensors_metadata(self.path) if self.path.suffix.lower() == ".safetensors" else {}


class Library:
    """The network files under some folders, by name and alias (the webui's lookup)."""

    def __init__(self, folders):
        if folders is None:
            folders = [DEFAULT_LORA_DIR]
        elif isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        self.folders = [Path(f) for f in folders]
        self._names: dict[str, NetworkFile] | None = None

    def scan(self) -> dict[str, NetworkFile]:
        names: dict[str, NetworkFile] = {}
        aliases: dict[str, NetworkFile] = {}
        forbidden = {"none"}  # the webui's forbidden_network_aliases
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for root, dirs, filenames in os.walk(folder, followlinks=True):
                dirs.sort()
                for filename in sorted(filenames):
                    path = Path(root) / filename
                    if path.suffix.lower() not in files.EXTENSIONS:
                        continue
                    entry = NetworkFile(path.stem, path, path.stem)
                    alias = entry.metadata.get("ss_output_name", entry.name)
                    entry = NetworkFile(entry.name, path, alias)
                    if alias in aliases or alias in names:
                        forbidden.add(alias.lower())
                    names[entry.name] = entry
                    aliases[alias] = entry
        table = dict(aliases)
        table.update(names)
        self._names = {k: v for k, v in table.items() if k in names or k.lower() not in forbidden}
        return self._names

    def get(self, name: str) -> NetworkFile:
        entry = (self._names or {}).get(name)
        if entry is None or not entry.path.is_file():
            entry = self.scan().get(name)
        if entry is None:
            where = ", ".join(str(f) for f in self.folders)
            raise SdrtError(f"no LoRA named {name!r} in {where} (a file stem or the ss_output_name of its "
                            f"metadata; --lora-dir sets the folder)")
        return entry


# -- the active set --

@dataclass(frozen=True)
class Active:
    """One network of the set: its file, as the prompt named it, with its multipliers."""

    file: NetworkFile
    mentioned: str
    te: float
    unet: float
    dyn: int | None
    sha256: str

    def multiplier(self, component: str) -> float:
        return self.te if component in TE_COMPONENTS else self.unet


class Overrides:
    """Initializer values a session is made with. Those in external data go in through ONNX
    Runtime's ``add_external_initializers``; those inside the graph file are written into a copy of
    its bytes in memory (same size, same place), which the session is made from: ORT's
    ``add_initializer`` is not honoured by every CPU graph transformer (its NCHWc convolution
    layout reads the file's value of a small convolution's weight and bias), and
    ``add_external_initializers`` refuses initializers that are not external."""

    def __init__(self, arrays: dict[str, np.ndarray], index: dict):
        self.arrays = arrays
        self._digest: str | None = None
        self.external = frozenset(k for k in arrays if index[k].external)
        self.inline = {k: index[k].span for k in arrays if k not in self.external}
        unpatchable = [k for k in self.inline if index[k].field not in (4, 9) or index[k].span is None]
        if unpatchable:
            raise SdrtError(f"cannot replace the initializers {', '.join(unpatchable[:_SHOWN])} of the graph "
                            f"in place (values in int32_data); re-export the bundle")

    @property
    def digest(self) -> str:
        """A digest of the values (names, types, shapes, bytes): what keys the TensorRT EP's engines
        built with them."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            for name in sorted(self.arrays):
                a = np.ascontiguousarray(self.arrays[name])
                h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
                h.update(memoryview(a).cast("B"))
            self._digest = h.hexdigest()
        return self._digest

    def add_to(self, options, path: Path) -> list:
        """Put the external values into ``options`` (an ``onnxruntime.SessionOptions``) for the graph
        at ``path``; the OrtValues returned must live as long as the session."""
        import onnxruntime as ort

        names = sorted(self.external)
        values = [ort.OrtValue.ortvalue_from_numpy(self.arrays[k]) for k in names]
        if values:
            options.add_external_initializers(names, values)
        if self.inline:  # the session is made from bytes: where its external data is
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(path).parent))
        return values

    def model(self, path: Path):
        """The graph to make the session from: its path, or its bytes with the inline values written in
        (ONNX Runtime then finds the external data through the session option naming its folder)."""
        if not self.inline:
            return str(path)
        data = bytearray(Path(path).read_bytes())
        for name, (offset, length) in self.inline.items():
            raw = np.ascontiguousarray(self.arrays[name]).tobytes()
            if len(raw) != length:
                raise SdrtError(f"{path}: the new value of {name} has {len(raw)} bytes, the graph's {length}")
            data[offset:offset + length] = raw
        return bytes(data)


def check_session(session, component: str, what: str) -> None:
    """Merged weights go into ONNX Runtime sessions (CPU, CUDA, and the TensorRT EP, whose engine
    cache is then keyed by the values) and refit sdrt's TensorRT engines; other backends refuse."""
    if not hasattr(session, "set_overrides"):
        raise SdrtError(f"{what} are not supported by the {component} backend {type(session).__name__}")


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@dataclass
class _GraphCache:
    sets: OrderedDict = field(default_factory=OrderedDict)


class Networks:
    """The LoRA / LyCORIS networks and hypernetworks of a pipeline's bundle: ``activate(prompt,
    sessions)`` puts the prompt's set into the sessions (made again only when the set changes) and
    returns the infotext fields (``Lora hashes``; the webui writes nothing for hypernetworks but
    the prompt's tags)."""

    def __init__(self, bundle, lora_dir=None, hypernetwork_dir=None):
        self.bundle = bundle
        self.library = Library(lora_dir)
        self.hypernets = hypernet.Hypernetworks(hypernetwork_dir)
        self._provenance: dict[str, provenance.Provenance] = {}
        self._names: dict[str, dict[str, str]] | None = None
        self._hashes: dict[tuple, tuple[str, str]] = {}  # stat key -> (sha256, webui hash)
        self._parsed: dict[tuple, ParsedNetwork] = {}
        self._cache: dict[str, OrderedDict] = {}
        self._current = weakref.WeakKeyDictionary()  # session -> the signature in place

    def provenance(self, component: str) -> provenance.Provenance:
        if component not in self._provenance:
            self._provenance[component] = provenance.load(self.bundle.path / component)
        return self._provenance[component]

    def names(self) -> dict[str, dict[str, str]]:
        if self._names is None:
            self._names = {c: layer_names(c, self.provenance(c)) for c in COMPONENTS
                           if (self.bundle.path / c).is_dir()}
        return self._names

    def resolve(self, tags: list[ExtraNetwork]) -> list[Active]:
        """The prompt's ``<lora:...>`` / ``<lyco:...>`` tags as files with multipliers (one-line errors)."""
        out = []
        for tag in tags:
            if tag.type not in ("lora", "lyco"):
                continue
            if not tag.name:
                raise SdrtError(f"{tag.tag} in the prompt names no network")
            te, unet = tag.multipliers()
            dyn = tag.named.get("dyn", tag.positional[3] if len(tag.positional) > 3 else None)
            try:
                dyn = int(dyn) if dyn is not None else None
            except ValueError:
                raise SdrtError(f"cannot read the rank {dyn!r} of {tag.tag} in the prompt") from None
            entry = self.library.get(tag.name)
            sha, _ = self._hash(entry)
            out.append(Active(entry, tag.name, te, unet, dyn, sha))
        return out

    def _hash(self, entry: NetworkFile) -> tuple[str, str]:
        key = _stat_key(entry.path)
        if key not in self._hashes:
            self._hashes[key] = (files.sha256(entry.path), files.network_hash(entry.path, entry.metadata))
        return self._hashes[key]

    def infotext(self, active: list[Active]) -> dict:
        """``Lora hashes: "name: hash, ..."`` as the webui's ``extra_networks_lora.activate`` writes it
        (the name as the prompt gave it without ``:`` and ``,``, 12 hex digits)."""
        entries = [f"{a.mentioned.replace(':', '').replace(',', '')}: {self._hash(a.file)[1][:12]}"
                   for a in active]
        return {"Lora hashes": ", ".join(entries) or None}

    def activate(self, prompt: str, sessions: dict) -> dict:
        """Put the networks the prompt names into ``sessions`` (component -> Session) and return
        the infotext fields."""
        _, tags = parse_prompt(prompt)
        active = self.resolve(tags)
        # A multiplier of 0 leaves the context as it is (x + 0 * mlp(x))
        hypernets = [h for h in self.hypernets.resolve(tags) if h.multiplier != 0]
        if not active and not hypernets and not self._current:
            return {"Lora hashes": None}
        # Every component's merge first, then the sessions: a file that fails leaves all as they were
        changes = []
        for component, session in sessions.items():
            used = [a for a in active if a.multiplier(component) != 0]
            signature = tuple((a.sha256, a.multiplier(component), a.dyn) for a in used)
            # Hypernetworks change the UNet's attention context (runtime/networks/hypernet.py)
            hyper = tuple((h.sha256, h.multiplier) for h in hypernets) if component == "unet" else ()
            full = signature + ((("hypernet",) + hyper,) if hyper else ())
            if self._current.get(session, ()) != full:
                check_session(session, component, "hypernetworks" if hyper and not used else "LoRA networks")
                if hyper and not getattr(session, "takes_graph_edits", False):  # a TensorRT engine refits weights only
                    raise SdrtError(f"hypernetworks are not supported by the {component} backend "
                                    f"{type(session).__name__}: they add nodes to the graph (use an ONNX Runtime backend)")
                overrides = self._overrides(component, session, used, signature)
                if hyper:
                    overrides = self.hypernets.overrides(self.provenance(component), session, hypernets, overrides,
                                                         full)
                changes.append((session, full, overrides))
        for session, signature, overrides in changes:
            session.set_overrides(overrides)
            self._current[session] = signature
        return self.infotext(active)

    def _overrides(self, component: str, session, active: list[Active], signature: tuple) -> Overrides | None:
        """The merged initializers of the session's graph for a set (None: the graph's own), cached."""
        if not signature:
            return None
        cache = self._cache.setdefault(str(session.path), OrderedDict())
        overrides = cache.get(signature)
        if overrides is None:
            overrides = self._merge(component, Path(session.path), active)
            cache[signature] = overrides
            while len(cache) > CACHE_SETS:
                cache.popitem(last=False)
        else:
            cache.move_to_end(signature)
        return overrides

    def _parse(self, a: Active) -> ParsedNetwork:
        key = _stat_key(a.file.path)
        if key not in self._parsed:
            parsed = parse_network(a.file.path, files.read_tensors(a.file.path), self.names())
            if parsed.unmatched:
                shown = ", ".join(parsed.unmatched[:_SHOWN]) + (", ..." if len(parsed.unmatched) > _SHOWN else "")
                log.warning("%s: %d keys match nothing in the model: %s", a.file.path, len(parsed.unmatched), shown)
            self._parsed[key] = parsed
            while len(self._parsed) > PARSED_FILES:
                self._parsed.pop(next(iter(self._parsed)))
        return self._parsed[key]

    def _merge(self, component: str, graph: Path, active: list[Active]) -> Overrides:
        """The merged initializers of ``graph`` for the set: each network's change added in turn to
        the source weights it targets, as the webui's ``network_apply_weights`` does."""
        prov = self.provenance(component)
        gprov = prov.graph(graph)
        weights = GraphWeights(graph)
        provenance.check_graph(prov, gprov, weights.index, graph)
        # An int8 graph's quantized weights are read from the float graphs they were quantized from
        floats = float_graphs(prov, gprov, graph)
        graphs = [(gprov, weights)] + list(floats.values())
        held = [(g, w, g.by_source()) for g, w in graphs]
        current: dict[str, np.ndarray] = {}
        missing = []

        def source(key: str) -> np.ndarray | None:
            if key not in current:
                found = next(((g, w, by[key][0]) for g, w, by in held if by.get(key)), None)
                if found is None:
                    return None
                g, w, name = found
                entry = g.initializers[name]
                parts = provenance.split_parts(np.asarray(w.read(name), np.float32), entry, prov)
                i = [k for k, _ in entry.parts].index(key) if key in [k for k, _ in entry.parts] else 0
                current[key] = np.array(parts[i], np.float32)
            return current[key]

        for a in active:
            where = str(a.file.path)
            multiplier = a.multiplier(component)
            for (target_component, module_name), module in self._parse(a).modules.items():
                if target_component != component:
                    continue
                wkey, bkey = module_name + ".weight", module_name + ".bias"
                w = source(wkey)
                if w is None:
                    missing.append(wkey)
                    continue
                delta, bias_delta = lora.updown_or_error(module, w, multiplier, a.dyn, where)
                current[wkey] = w + delta
                if bias_delta is not None:
                    b = source(bkey)
                    if b is None or b.size != bias_delta.size:
                        missing.append(bkey)
                    else:
                        current[bkey] = b + bias_delta.reshape(b.shape)
        if missing and gprov.quantized and gprov.quantization is None:
            raise SdrtError(unrecorded_quantization(graph))
        if missing:
            log.warning("%s: %d weights the networks change are not in the graph (shared with other weights "
                        "or folded away): %s", graph, len(missing), ", ".join(missing[:_SHOWN]))
        return build_overrides(prov, gprov, weights, current, floats)


def unrecorded_quantization(graph: Path) -> str:
    return (f"{graph} is quantized (int8) and was exported before sdrt recorded how its weights were "
            f"quantized: re-export the bundle to use LoRA or VAE files on it (or use --precision fp32)")


def float_graphs(prov: provenance.Provenance, gprov: provenance.GraphProvenance,
                 graph: Path) -> dict[str, tuple[provenance.GraphProvenance, GraphWeights]]:
    """The float graphs (beside ``graph``) that an int8 graph's quantized weights were made from."""
    out = {}
    for name in sorted({r.graph for r in (gprov.quantization or {}).values()}):
        path = Path(graph).parent / name
        g, w = prov.graph(path), GraphWeights(path)
        provenance.check_graph(prov, g, w.index, path)
        out[name] = (g, w)
    return out


def _rebuilt(prov: provenance.Provenance, gprov: provenance.GraphProvenance, weights: GraphWeights, name: str,
             values: dict[str, np.ndarray]) -> np.ndarray | None:
    """Initializer ``name`` with the new source values in its layout and dtype; None when it holds
    several equal source weights that the values change differently."""
    entry = gprov.initializers[name]
    keys = [k for k, _ in entry.parts]
    if entry.same and not all(k in values and np.array_equal(values[k], values[keys[0]]) for k in entry.keys):
        return None
    original = np.asarray(weights.read(name))
    parts = provenance.split_parts(original.astype(np.float32), entry, prov)
    parts = [values.get(k, p) for k, p in zip(keys, parts)]
    return np.ascontiguousarray(provenance.join_parts(parts, entry, original.shape)).astype(original.dtype)


def requantized(prov: provenance.Provenance, gprov: provenance.GraphProvenance, weights: GraphWeights,
                values: dict[str, np.ndarray], skipped: list[str],
                floats: dict | None = None) -> dict[str, np.ndarray]:
    """An int8 graph's quantized weights that hold any of ``values``: the float weight each was
    quantized from, merged, quantized again the way the exporter did (new scale from the merged
    weight's range; a QLinearConv's int32 bias again at the new scale). Names the ones left alone
    in ``skipped``. ``floats``: the float graphs, when the caller read them already (:func:`float_graphs`)."""
    if gprov.quantization is None:
        held = gprov.by_source()
        if any(k not in held for k in values):
            raise SdrtError(unrecorded_quantization(weights.path))
        return {}
    floats = float_graphs(prov, gprov, weights.path) if floats is None else floats
    out, held = {}, set(gprov.by_source())
    for name, r in gprov.quantization.items():
        fg, fw = floats[r.graph]
        held.update(k for n in (r.initializer, r.bias[1] if r.bias else None) if n in fg.initializers
                    for k in fg.initializers[n].keys)
        bias = r.bias[1] if r.bias else None
        touched = [n for n in (r.initializer, bias) if n in fg.initializers
                   and any(k in values for k in fg.initializers[n].keys)]
        if not touched:
            continue
        new = {n: _rebuilt(prov, fg, fw, n, values) for n in touched}
        if any(v is None for v in new.values()):
            skipped.append(name)
            continue
        w = new.get(r.initializer)
        w = np.asarray(fw.read(r.initializer), np.float32) if w is None else w.astype(np.float32)
        q, scale, zero = quantized.quantize(w.T if r.transpose else w, r.scheme)
        out[name] = q
        out[r.scale] = scale.reshape(weights.index[r.scale].dims)
        if not np.array_equal(zero.reshape(-1), weights.read(r.zero_point).reshape(-1)):
            out[r.zero_point] = zero.reshape(weights.index[r.zero_point].dims)
        if r.bias:
            quantized_bias, _, input_scale = r.bias
            b = new.get(bias)
            b = np.asarray(fw.read(bias), np.float32) if b is None else b
            out[quantized_bias] = quantized.quantize_bias(b, weights.read(input_scale), scale)
    # A weight the float graphs hold that this graph holds neither in float nor by a record
    quantized_away = {k for g, _ in floats.values() for k in g.by_source()} - held
    lost = sorted(k for k in values if k in quantized_away)
    if lost:
        log.warning("%s: %d changed weights are quantized without a record in this graph and keep their values: %s",
                    weights.path, len(lost), ", ".join(lost[:_SHOWN]))
    return out


def build_overrides(prov: provenance.Provenance, gprov: provenance.GraphProvenance, weights: GraphWeights,
                    values: dict[str, np.ndarray], floats: dict | None = None) -> Overrides:
    """The initializers of a graph that hold any of ``values`` (source key -> new value), rebuilt in
    their layout and dtype; an int8 graph's quantized weights re-quantized (:func:`requantized`).
    An initializer the exporter shared between several equal source weights is replaced only when
    they all get the same new value (else a warning names it)."""
    provenance.check_graph(prov, gprov, weights.index, weights.path)
    arrays, skipped = {}, []
    for name, entry in gprov.initializers.items():
        if not any(k in values for k in entry.keys):
            continue
        value = _rebuilt(prov, gprov, weights, name, values)
        if value is None:
            skipped.append(name)
        else:
            arrays[name] = value
    if gprov.quantized:
        arrays.update(requantized(prov, gprov, weights, values, skipped, floats))
    if skipped:
        log.warning("%s: %d graph weights hold several model weights the networks change differently; left "
                    "as they are: %s", weights.path, len(skipped), ", ".join(skipped[:_SHOWN]))
    return Overrides(arrays, weights.index)
