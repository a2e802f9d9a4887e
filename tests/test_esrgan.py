"""ESRGAN / Real-ESRGAN upscalers: the exported graph against the torch RRDBNet it came from, the
webui's tiling (``upscale_with_model``: ``split_grid`` / ``combine_grid``) and the file checks.

The reference network is BasicSR's RRDBNet written out here (small: 8 features, 2 blocks), saved
as a ``.pth`` in the Real-ESRGAN layout (``params_ema``) and in the original ESRGAN layout.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_sdrt
from PIL import Image
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.metrics import psnr
from sdrt.runtime.pipeline import upscale
from test_img2img import init_image

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class Dense(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        for i, c_in in enumerate((nf, nf + gc, nf + 2 * gc, nf + 3 * gc, nf + 4 * gc), 1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, nf if i == 5 else gc, 3, 1, 1))

    def forward(self, x):
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class Block(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = Dense(nf, gc), Dense(nf, gc), Dense(nf, gc)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class Reference(nn.Module):
    """RRDBNet (Real-ESRGAN's names), 4x; ``unshuffle`` 2: the 2x variant."""

    def __init__(self, nf=8, nb=2, gc=4, unshuffle=1):
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(3 * unshuffle**2, nf, 3, 1, 1)
        self.body = nn.Sequential(*(Block(nf, gc) for _ in range(nb)))
        for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            setattr(self, name, nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for up in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def old_layout(state: dict, nb: int) -> dict:
    """The original ESRGAN file's key names for the same weights."""
    out = {}
    for k, v in state.items():
        part, _, rest = k.partition(".")
        if part == "body":
            i, rdb, conv, p = rest.split(".")
            out[f"model.1.sub.{i}.{rdb.upper()}.{conv}.0.{p}"] = v
        else:
            index = {"conv_first": "0", "conv_up1": "3", "conv_up2": "6", "conv_hr": "8", "conv_last": "10"}
            out[f"model.1.sub.{nb}.{rest}" if part == "conv_body" else f"model.{index[part]}.{rest}"] = v
    return out


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("esrgan")
    four, two = Reference().eval(), Reference(unshuffle=2).eval()
    for net in (four, two):  # lift the random weights so the output is not all clipped
        with torch.no_grad():
            net.conv_last.bias.fill_(0.5)
    torch.save({"params_ema": four.state_dict()}, d / "4x-tiny.pth")
    torch.save(old_layout(four.state_dict(), 2), d / "4x-tiny-old.pth")
    torch.save({"params": two.state_dict()}, d / "2x-tiny.pth")
    return d, four, two


def torch_patch(net, image: Image.Image) -> Image.Image:
    """The webui's upscale_pil_patch: BGR in [0, 1], the network, clamped, rounded, back to RGB."""
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(image)[:, :, ::-1], (2, 0, 1))) / 255)
    with torch.no_grad():
        y = net(x[None].float())[0].clamp(0, 1).numpy()
    return Image.fromarray((255.0 * np.moveaxis(y, 0, 2)).round().astype(np.uint8)[:, :, ::-1].copy(), "RGB")


def webui_tiled(net, image: Image.Image, tile: int, overlap: int) -> Image.Image:
    """upscale_with_model with the torch network: split_grid, each tile upscaled, combine_grid."""
    grid = upscale.split_grid(image, tile, tile, overlap)
    tiles = [[y * 4, h * 4, [[x * 4, w * 4, torch_patch(net, t)] for x, w, t in row]] for y, h, row in grid]
    return upscale.combine_grid(tiles, tile * 4, image.width * 4, image.height * 4, overlap * 4)


@pytest.mark.parametrize("name, which", [("4x-tiny.pth", 1), ("4x-tiny-old.pth", 1), ("2x-tiny.pth", 2)])
def test_graph_matches_the_torch_network(nets, tmp_path, name, which):
    from sdrt.export.esrgan import export_esrgan

    d, four, two = nets
    net = four if which == 1 else two
    record = export_esrgan(d / name, tmp_path / "up.onnx")
    assert record["scale"] == (4 if which == 1 else 2)
    up = upscale.ModelUpscaler("tiny", tmp_path / "up.onnx", record["scale"], tile=0)
    image = init_image(40, 24)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, 24, 40)).astype(np.float32))
    with torch.no_grad():
        expected = net(x).numpy()
    got = up.session.run({"image": x.numpy()}, ["upscaled"])["upscaled"]
    assert got.shape == expected.shape
    assert psnr(expected, got, peak=1.0) >= 60
    assert np.abs(np.asarray(up.patch(image)).astype(int) - np.asarray(torch_patch(net, image))).max() <= 1


def test_tiled_as_the_webui(nets, tmp_path):
    from sdrt.export.esrgan import export_esrgan

    d, four, _ = nets
    export_esrgan(d / "4x-tiny.pth", tmp_path / "up.onnx")
    up = upscale.ModelUpscaler("tiny", tmp_path / "up.onnx", 4, tile=32, overlap=8)
    image = init_image(70, 45)
    # the webui's upscale_with_model with the torch network: split, each tile upscaled, combined
    grid = upscale.split_grid(image, 32, 32, 8)
    assert [[x for x, _, _ in row] for _, _, row in grid] == [[0, 19, 38]] * 2 and [y for y, _, _ in grid] == [0, 13]
    expected = np.asarray(webui_tiled(four, image, 32, 8)).astype(int)
    got = np.asarray(up(image)).astype(int)
    assert got.shape == expected.shape == (180, 280, 3)
    assert np.abs(got - expected).max() <= 1  # a rounding step apart where ORT and torch differ by an ulp
    # Upscaler.upscale: one 4x pass for scale 4; for 3x, one 4x pass then Lanczos down to 3x (a multiple of 8)
    assert upscale.upscale(image, 4, up).size == (280, 176)
    assert upscale.upscale(image, 3, up).size == (208, 128)


def test_not_an_esrgan_file_is_one_line(tmp_path):
    from sdrt.export.esrgan import build

    torch.save({"model.diffusion_model.x.weight": torch.zeros(1)}, tmp_path / "sd.pth")
    with pytest.raises(SdrtError, match="not an ESRGAN network") as e:
        build(tmp_path / "sd.pth")
    assert "\n" not in str(e.value)
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {canary}",)

    torch.save({"params_ema": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(SdrtError):
        build(tmp_path / "evil.pth")
    assert not canary.exists()


def test_cli_upscale_with_an_esrgan_file(nets, tmp_path):
    d, four, _ = nets
    src = tmp_path / "in.png"
    init_image(40, 24).save(src)
    env = {"SDRT_CACHE": str(tmp_path / "cache")}
    r = run_sdrt("upscale", src, "--upscaler", "4x-tiny", "--esrgan-dir", d, "--scale", 4, "-o", tmp_path / "out",
                 env_extra=env)
    assert r.returncode == 0, r.stderr
    with Image.open(r.stdout.strip().splitlines()[-1]) as im:
        assert im.size == (160, 96) and im.text["postprocessing"].endswith("Postprocess upscaler: 4x-tiny")
        got = np.asarray(im.convert("RGB")).astype(int)
    # smaller than a tile: the webui's split_grid cuts one 192-pixel tile reaching past the top-left corner
    assert np.abs(got - np.asarray(webui_tiled(four, init_image(40, 24), 192, 8))).max() <= 1
    r = run_sdrt("upscale", src, "--upscaler", "4x-missing", "--esrgan-dir", d, "-o", tmp_path / "out", env_extra=env)
    assert r.returncode == 1 and r.stderr.startswith("error: upscaler: unknown upscaler '4x-missing'")
    assert r.stderr.count("\n") == 1
