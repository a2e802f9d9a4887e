"""ESRGAN / Real-ESRGAN upscaler files (``models/ESRGAN/*.pth``, where webui guides put them) -> ONNX.

The network is BasicSR's RRDBNet (Real-ESRGAN's layout: ``conv_first``, ``body.N.rdbM.convK``,
``conv_body``, ``conv_up1/2``, ``conv_hr``, ``conv_last``); files in the original ESRGAN layout
(``model.0``, ``model.1.sub.N.RDBM.convK.0``, ...) are renamed to it, and Real-ESRGAN's
``params_ema`` / ``params`` nesting is unwrapped. The 2x and 1x Real-ESRGAN variants (pixel
unshuffle before the first convolution) are recognised by their input channels. The file is read
with the safe loader (``load.py``: a pickle that references code is refused, never run), then
exported once, with dynamic height and width, to a graph the runtime runs tiled
(``runtime/pipeline/upscale.py``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from sdrt.export import load
from sdrt.runtime.errors import CheckpointError

ESRGAN_SUFFIXES = (".pth", ".pt", ".safetensors")


class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, 4x (two nearest 2x upsamplings); ``unshuffle`` 2 or 4 makes Real-ESRGAN's
    2x / 1x variants (the input pixel-unshuffled first)."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, unshuffle: int = 1):
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(in_nc * unshuffle * unshuffle, nf, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    @property
    def scale(self) -> int:
        return 4 // self.unshuffle

    def forward(self, x):
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


_OLD = [(re.compile(r"^model\.0\.(weight|bias)$"), r"conv_first.\1"),
        (re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$"), None),
        (re.compile(r"^model\.3\.(weight|bias)$"), r"conv_up1.\1"),
        (re.compile(r"^model\.6\.(weight|bias)$"), r"conv_up2.\1"),
        (re.compile(r"^model\.8\.(weight|bias)$"), r"conv_hr.\1"),
        (re.compile(r"^model\.10\.(weight|bias)$"), r"conv_last.\1")]


def _renamed(state: dict) -> dict:
    """Original-ESRGAN keys -> RRDBNet's (the trunk's last convolution ``model.1.sub.NB`` is ``conv_body``)."""
    if "conv_first.weight" in state:
        return state
    if "model.0.weight" not in state:
        raise CheckpointError("not an ESRGAN network: no conv_first / model.0 weights (ESRGAN and Real-ESRGAN "
                              "RRDBNet files are supported)")
    if any(k.startswith(("model.13.", "model.12.")) for k in state):
        raise CheckpointError("an 8x (or larger) original-ESRGAN network is not supported; 4x, and Real-ESRGAN's "
                              "2x / 1x, are")
    trunk = [int(m.group(1)) for k in state if (m := re.match(r"^model\.1\.sub\.(\d+)\.(weight|bias)$", k))]
    out = {}
    for key, value in state.items():
        for pattern, target in _OLD:
            m = pattern.match(key)
            if m and target is None:
                out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
                break
            if m:
                out[m.expand(target)] = value
                break
        else:
            m = re.match(r"^model\.1\.sub\.(\d+)\.(weight|bias)$", key)
            if m and trunk and int(m.group(1)) == max(trunk):
                out[f"conv_body.{m.group(2)}"] = value
            else:
                raise CheckpointError(f"not an ESRGAN network: unexpected weight {key!r}")
    return out


def _state(path: Path) -> dict:
    """The file's tensors, read safely; Real-ESRGAN's ``params_ema`` (or ``params``) nesting unwrapped."""
    fmt = load._sniff_format(path) if path.exists() else None
    if fmt in ("zip", "pickle"):
        obj = load._load_pickle(path, is_zip=fmt == "zip")
        if isinstance(obj, dict):
            obj = obj.get("params_ema", obj.get("params", obj))
        return load._unwrap_state_dict(obj, path.name)
    return load.load_state_dict(path)


def build(path: str | Path) -> RRDBNet:
    """The RRDBNet of an ESRGAN / Real-ESRGAN file, its weights loaded (one-line error for anything else)."""
    path = Path(path)
    state = _renamed(_state(path))
    try:
        nf, first_in = state["conv_first.weight"].shape[:2]
        out_nc = state["conv_last.weight"].shape[0]
        gc = state["body.0.rdb1.conv1.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(f"{path.name} is not an ESRGAN network (RRDBNet weights missing)") from None
    nb = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    unshuffle = {out_nc: 1, 4 * out_nc: 2, 16 * out_nc: 4}.get(first_in)
    if unshuffle is None:
        raise CheckpointError(f"{path.name}: {first_in} input channels for {out_nc} output channels is no ESRGAN layout")
    net = RRDBNet(out_nc, out_nc, nf, nb, gc, unshuffle)
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path.name} is not an ESRGAN network: {load._one_line(e)}") from None
    return net.eval()


def export_esrgan(path: str | Path, out: str | Path) -> dict:
    """Write ``out`` (an ONNX graph: ``image`` [1, 3, H, W] BGR in [0, 1] -> ``upscaled``) and
    ``out``.json (its scale) atomically; returns that record."""
    net, out = build(path), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sdrt-", suffix=".onnx.partial", dir=out.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(net, (torch.rand(1, 3, 32, 32),), tmp, input_names=["image"], output_names=["upscaled"],
                              dynamic_axes={"image": {2: "height", 3: "width"}, "upscaled": {2: "out_height",
                                                                                            3: "out_width"}},
                              opset_version=17, dynamo=False)
        record = {"scale": net.scale, "source": Path(path).name}
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = out.with_suffix(".json")
    meta_tmp = meta.with_name(f".{meta.name}.partial")
    meta_tmp.write_text(json.dumps(record))
    os.replace(meta_tmp, meta)
    return record
