"""LoRA and LyCORIS modules: a network file's weights per target layer, and the weight change each
makes, computed as the webui's built-in Lora extension computes it (``extensions-builtin/Lora``:
``network.py`` ``NetworkModule.finalize_updown`` / ``calc_scale`` / ``multiplier``,
``network_lora.py``, ``network_hada.py``, ``network_ia3.py``, ``network_lokr.py``,
``network_full.py``, ``network_norm.py``, ``lyco_helpers.py``), in numpy float32.

A module's ``updown(weight, multiplier)`` returns (weight delta, bias delta or None) for the
target's current weight in the source layout (a ``Linear`` [out, in], a ``Conv2d`` [out, in,
kh, kw], a norm [C]); the caller adds them, network after network, as the webui's
``network_apply_weights`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sdrt.runtime.errors import SdrtError


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _scalar(w: dict, key: str) -> float | None:
    v = w.get(key)
    if v is None:
        return None
    v = np.asarray(v)
    if v.size != 1:
        raise ValueError(f"{key} is not a single number (shape {list(v.shape)})")
    return float(v.reshape(-1)[0])


def rebuild_conventional(up, down, shape, dyn_dim=None) -> np.ndarray:
    """lyco_helpers.rebuild_conventional: (up @ down) reshaped, ranks cut to ``dyn_dim``."""
    up = up.reshape(up.shape[0], -1)
    down = down.reshape(down.shape[0], -1)
    if dyn_dim is not None:
        up, down = up[:, :dyn_dim], down[:dyn_dim, :]
    return (up @ down).reshape(shape)


def rebuild_cp_decomposition(up, down, mid) -> np.ndarray:
    up = up.reshape(up.shape[0], -1)
    down = down.reshape(down.shape[0], -1)
    return np.einsum("nmkl,in,mj->ijkl", mid, up, down)


def make_weight_cp(t, wa, wb) -> np.ndarray:
    temp = np.einsum("ijkl,jr->irkl", t, wb)
    return np.einsum("ijkl,ir->rjkl", temp, wa)


def make_kron(shape, w1, w2) -> np.ndarray:
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return np.kron(w1, w2).reshape(shape)


@dataclass
class Module:
    """One target layer's weights from a network file (``w``: the part after the layer name)."""

    kind: str  # lora | hada | ia3 | lokr | full | norm
    network_key: str  # the first key of the file naming this layer (for messages)
    w: dict[str, np.ndarray]

    @property
    def alpha(self) -> float | None:
        return _scalar(self.w, "alpha")

    def dim(self) -> int | None:
        w = self.w
        if self.kind == "lora":
            return int(w["lora_down.weight"].shape[0])
        if self.kind == "hada":
            return int(w["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            dim = None
            if "lokr_w1_b" in w:
                dim = int(w["lokr_w1_b"].shape[0])
            if "lokr_w2_b" in w:
                dim = int(w["lokr_w2_b"].shape[0])
            return dim
        return None

    def scale(self) -> float:
        """NetworkModule.calc_scale: ``scale`` if given, else alpha / rank, else 1."""
        scale = _scalar(self.w, "scale")
        if scale is not None:
            return scale
        dim, alpha = self.dim(), self.alpha
        return alpha / dim if dim is not None and alpha is not None else 1.0

    def updown(self, weight: np.ndarray, multiplier: float, dyn_dim: int | None = None):
        """(weight delta, bias delta or None) for the layer's current ``weight``."""
        updown, output_shape, ex_bias = getattr(self, f"_{self.kind}")(_f32(weight), dyn_dim)
        return self._finalize(updown, weight, output_shape, multiplier, ex_bias)

    def _finalize(self, updown, weight, output_shape, multiplier, ex_bias):
        """NetworkModule.finalize_updown."""
        bias = self.w.get("bias")
        if bias is not None:
            updown = (updown.reshape(bias.shape) + _f32(bias)).reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if updown.size == weight.size:
            updown = updown.reshape(weight.shape)
        if ex_bias is not None:
            ex_bias = _f32(ex_bias) * np.float32(multiplier)
        return updown * np.float32(self.scale() * multiplier), ex_bias

    def _lora(self, weight, dyn_dim):
        up, down = _f32(self.w["lora_up.weight"]), _f32(self.w["lora_down.weight"])
        mid = self.w.get("lora_mid.weight")
        output_shape = [up.shape[0], down.shape[1]]
        if mid is not None:  # CP decomposition (LoCon with a middle weight)
            mid = _f32(mid)
            return rebuild_cp_decomposition(up, down, mid), output_shape + list(mid.shape[2:]), None
        if down.ndim == 4:
            output_shape += list(down.shape[2:])
        return rebuild_conventional(up, down, output_shape, dyn_dim), output_shape, None

    def _hada(self, weight, dyn_dim):
        w1a, w1b, w2a, w2b = (_f32(self.w[k]) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        t1, t2 = self.w.get("hada_t1"), self.w.get("hada_t2")
        output_shape = [w1a.shape[0], w1b.shape[1]]
        if t1 is not None:
            t1 = _f32(t1)
            output_shape = [w1a.shape[1], w1b.shape[1]] + list(t1.shape[2:])
            updown1 = make_weight_cp(t1, w1a, w1b)
        else:
            if w1b.ndim == 4:
                output_shape += list(w1b.shape[2:])
            updown1 = rebuild_conventional(w1a, w1b, output_shape)
        if t2 is not None:
            updown2 = make_weight_cp(_f32(t2), w2a, w2b)
        else:
            updown2 = rebuild_conventional(w2a, w2b, output_shape)
        return updown1 * updown2, output_shape, None

    def _ia3(self, weight, dyn_dim):
        w = _f32(self.w["weight"])
        on_input = bool(_scalar(self.w, "on_input") or 0)  # LyCORIS always writes it; the webui requires it
        output_shape = [w.shape[0], weight.shape[1]]
        if on_input:
            output_shape.reverse()
        else:
            w = w.reshape(-1, 1)
        return weight * w, output_shape, None

    def _lokr(self, weight, dyn_dim):
        w = self.w
        w1 = _f32(w["lokr_w1"]) if "lokr_w1" in w else _f32(w["lokr_w1_a"]) @ _f32(w["lokr_w1_b"])
        if "lokr_w2" in w:
            w2 = _f32(w["lokr_w2"])
        elif "lokr_t2" not in w:
            w2 = _f32(w["lokr_w2_a"]) @ _f32(w["lokr_w2_b"])
        else:
            w2 = make_weight_cp(_f32(w["lokr_t2"]), _f32(w["lokr_w2_a"]), _f32(w["lokr_w2_b"]))
        output_shape = [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        if weight.ndim == 4:
            output_shape = list(weight.shape)
        return make_kron(output_shape, w1, w2), output_shape, None

    def _full(self, weight, dyn_dim):
        diff = _f32(self.w["diff"])
        return diff, list(diff.shape), self.w.get("diff_b")

    def _norm(self, weight, dyn_dim):
        w_norm = _f32(self.w["w_norm"])
        return w_norm, list(w_norm.shape), self.w.get("b_norm")


def module_kind(w: dict) -> str | None:
    """The module type that accepts these weights, tried in the webui's order (``networks.module_types``):
    LoRA (``lora_up``/``lora_down``, or diffusers / PEFT ``lora_B``/``lora_A``), LoHa, (IA)^3,
    LoKr, full diff, norm diff. OFT and GLoRA, which the webui also reads, are not supported."""
    if "lora_up.weight" in w and "lora_down.weight" in w:
        return "lora"
    if "lora_A.weight" in w and "lora_B.weight" in w:
        w["lora_up.weight"], w["lora_down.weight"] = w.pop("lora_B.weight"), w.pop("lora_A.weight")
        return "lora"
    if all(k in w for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "hada"
    if "weight" in w:
        return "ia3"
    has_1 = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
    has_2 = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
    if has_1 and has_2:
        return "lokr"
    if "diff" in w:
        return "full"
    if "w_norm" in w and "b_norm" in w:
        return "norm"
    return None


def updown_or_error(module: Module, weight: np.ndarray, multiplier: float, dyn_dim, where: str):
    """``module.updown`` with shape mismatches as one line naming the file and the key."""
    if "dora_scale" in module.w:
        raise SdrtError(f"{where}: {module.network_key}: DoRA weights (dora_scale) are not supported yet")
    try:
        delta, bias = module.updown(weight, multiplier, dyn_dim)
    except (ValueError, KeyError, IndexError) as e:
        raise SdrtError(f"{where}: {module.network_key}: cannot apply to a weight of shape "
                        f"{list(weight.shape)} ({e})") from None
    if delta.shape != weight.shape:
        raise SdrtError(f"{where}: {module.network_key}: makes a change of shape {list(delta.shape)} for a "
                        f"weight of shape {list(weight.shape)}")
    return delta, bias
