"""The hostile-input corpus (issue #21): files and command lines sdrt must refuse with one line.

Every case is an ``sdrt`` command line plus the files it names, written here from a tiny exported
model rather than committed: malicious pickles (each would change a canary file if unpickled),
ONNX external data that leaves its bundle, truncated graphs and checkpoints, tampered manifests,
checkpoints whose embedded configs are wrong, and values the CLI must refuse.

    python -m tools.make_hostile_corpus OUT --checkpoint CKPT --bundle BUNDLE
        writes the corpus under OUT and the case list OUT/cases.json
    python -m tools.make_hostile_corpus --run OUT
        runs every case of OUT/cases.json and writes OUT/results.json (exit status, stdout, stderr)

``--run`` imports sdrt's CLI, torch and ONNX Runtime once and forks a child per case, which runs
the CLI's ``main`` as ``python -m sdrt.cli`` would (an uncaught exception prints its traceback
to stderr and exits 1, as the interpreter does), with SDRT_CACHE pointed at the case's own folder.
tests/test_hostile.py checks the results, and runs a few cases as real subprocesses too.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import pickle
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

CANARY_TEXT = "canary: untouched\n"


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    expect: str  # a piece of the one stderr line (case-insensitive)
    make: Callable  # make(ctx, case_dir) -> the sdrt arguments, writing the files they name


@dataclass(frozen=True)
class Ctx:
    checkpoint: Path  # the tiny model as a .safetensors checkpoint with its sdrt.configs
    bundle: Path  # the tiny model exported
    canary: Path  # the case's own: a pickle that ran would change or delete it


# --- malicious pickles ---------------------------------------------------------------------------

def _payloads(canary: Path) -> dict[str, tuple]:
    """(callable, args) pairs that change the canary when a pickle's REDUCE calls them."""
    append = f"open({str(canary)!r}, 'a').write('pwned')"
    return {
        "os-system": (os.system, (f"echo pwned >> '{canary}'",)),
        "exec": (builtins.exec, (append,)),
        "eval": (builtins.eval, (append,)),
        "os-remove": (os.remove, (str(canary),)),
        "subprocess": (subprocess.call, (["sh", "-c", f"echo pwned >> '{canary}'"],)),
    }


class _Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _write_pickle(path: Path, obj, fmt: str) -> Path:
    """``obj`` pickled as torch's zip format, its legacy format, or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "raw":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        import torch

        torch.save(obj, str(path), _use_new_zipfile_serialization=fmt == "zip")
    return path


def _evil_checkpoint(payload: str, suffix: str, fmt: str, command: str):
    def make(ctx: Ctx, d: Path) -> list:
        fn, args = _payloads(ctx.canary)[payload]
        # the payload nested inside an ordinary-looking state dict
        path = _write_pickle(d / f"model{suffix}", {"state_dict": {"model.diffusion_model.x": _Evil(fn, args)}}, fmt)
        return ["export", path, d / "out"] if command == "export" else _generate(d, "-m", path)
    return make


def _evil_diffusers(ctx: Ctx, d: Path) -> list:
    from sdrt.export.tiny import scaled_sd1_configs

    folder = d / "diffusers"
    configs = scaled_sd1_configs()
    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    fn, args = _payloads(ctx.canary)["exec"]
    for name, config, weights in (("unet", "unet", "diffusion_pytorch_model.bin"),
                                  ("vae", "vae", "diffusion_pytorch_model.bin"),
                                  ("text_encoder", "text_encoder", "pytorch_model.bin")):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(configs[config]))
        _write_pickle(folder / name / weights, {"w": _Evil(fn, args)}, "zip")
    return _generate(d, "-m", folder)


def _evil_embedding(suffix: str, fmt: str):
    def make(ctx: Ctx, d: Path) -> list:
        fn, args = _payloads(ctx.canary)["os-system"]
        _write_pickle(d / "embeddings" / f"evilstyle{suffix}", {"string_to_param": {"*": _Evil(fn, args)}}, fmt)
        return _generate(d, "-m", ctx.bundle, "--embeddings-dir", d / "embeddings", prompt="a evilstyle cat")
    return make


def _bad_embedding(header: str):
    """A ``.safetensors`` embedding whose header the fuzzer found crashing the reader (fixed)."""
    def make(ctx: Ctx, d: Path) -> list:
        (d / "embeddings").mkdir()
        data = header.encode()
        (d / "embeddings" / "oddstyle.safetensors").write_bytes(len(data).to_bytes(8, "little") + data + bytes(16))
        return _generate(d, "-m", ctx.bundle, "--embeddings-dir", d / "embeddings", prompt="a oddstyle cat")
    return make


# --- bundles: copies with one thing changed --------------------------------------------------------

def _copy_bundle(ctx: Ctx, d: Path) -> Path:
    """A copy of the tiny bundle whose files are hard links (change a file only through ``_replace``),
    except the external data files, which onnx refuses to read through a hard link."""
    def link(src, dst):
        return shutil.copy2(src, dst) if str(src).endswith(".onnx_data") else os.link(src, dst)

    dst = d / "bundle"
    shutil.copytree(ctx.bundle, dst, copy_function=link)
    return dst


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # a hard link: never write through it into the original
    path.write_bytes(data)


def _manifest_case(edit: Callable[[dict, Ctx], object], raw: bytes | None = None):
    def make(ctx: Ctx, d: Path) -> list:
        b = _copy_bundle(ctx, d)
        m = json.loads((b / "sdrt.json").read_text())
        m = edit(m, ctx) if edit is not None else m
        _replace(b / "sdrt.json", raw if raw is not None else json.dumps(m).encode())
        return _generate(d, "-m", b)
    return make


def _set(path: str, value):
    """A manifest edit setting the dotted ``path`` (deleting it for ``...``); value(ctx) when callable."""
    def edit(m: dict, ctx: Ctx):
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value(ctx) if callable(value) else value
        return m
    return edit


def _external_data(target: str):
    """The text encoder's graphs with their weights in an external file outside the bundle:
    ``rel`` (a relative ``..`` path), ``abs`` (an absolute one), ``dev-zero`` or ``symlink`` (the
    bundle's ``model.onnx_data`` a symbolic link to a file outside)."""
    def make(ctx: Ctx, d: Path) -> list:
        import onnx
        from onnx.external_data_helper import convert_model_to_external_data

        b = _copy_bundle(ctx, d)
        outside = d / "outside"
        outside.mkdir()
        folder = b / "text_encoder"
        for graph in sorted(folder.glob("*.onnx")):
            data_name = f"{graph.stem}.onnx_data"
            model = onnx.load(str(graph))
            for f in folder.glob(f"{graph.stem}.onnx_data*"):
                f.unlink()
            convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data_name, size_threshold=0)
            graph.unlink()
            onnx.save_model(model, str(graph))  # writes folder/data_name
            moved = outside / data_name
            shutil.move(folder / data_name, moved)
            location = {"rel": os.path.relpath(moved, folder), "abs": str(moved), "dev-zero": "/dev/zero",
                        "symlink": data_name}[target]
            if target == "symlink":
                (folder / data_name).symlink_to(moved)
            model = onnx.load(str(graph), load_external_data=False)
            for t in model.graph.initializer:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = location
            graph.unlink()
            onnx.save_model(model, str(graph))
        return _generate(d, "-m", b)
    return make


def _truncated_graph(ctx: Ctx, d: Path) -> list:
    b = _copy_bundle(ctx, d)
    for graph in (b / "unet").glob("*.onnx"):
        data = graph.read_bytes()
        _replace(graph, data[: len(data) // 2])
    return _generate(d, "-m", b)


def _missing_graph(ctx: Ctx, d: Path) -> list:
    b = _copy_bundle(ctx, d)
    (b / "unet" / "model.onnx").unlink()
    return _generate(d, "-m", b)


# --- checkpoints -----------------------------------------------------------------------------------

def _truncated_checkpoint(fraction: float, command: str = "export"):
    def make(ctx: Ctx, d: Path) -> list:
        data = ctx.checkpoint.read_bytes()
        path = d / "model.safetensors"
        path.write_bytes(data[: int(len(data) * fraction)])
        return ["export", path, d / "out"] if command == "export" else _generate(d, "-m", path)
    return make


def _huge_header(ctx: Ctx, d: Path) -> list:
    path = d / "model.safetensors"
    path.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    return ["export", path, d / "out"]


def _truncated_ckpt(ctx: Ctx, d: Path) -> list:
    from safetensors.torch import load_file
    from sdrt.export.write import save_checkpoint

    path = save_checkpoint(load_file(str(ctx.checkpoint)), {}, d / "full.ckpt")
    data = path.read_bytes()
    path.unlink()
    (d / "model.ckpt").write_bytes(data[: len(data) // 2])
    return ["export", d / "model.ckpt", d / "out"]


def _configs_case(edit: Callable[[dict], object] | None = None, text: str | None = None, command: str = "export"):
    """The tiny checkpoint with its embedded ``sdrt.configs`` changed by ``edit`` (or set to ``text``)."""
    def make(ctx: Ctx, d: Path) -> list:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(ctx.checkpoint), framework="pt") as f:
            configs = json.loads(f.metadata()["sdrt.configs"])
        if edit is not None:
            configs = edit(configs) or configs
        path = d / "model.safetensors"
        save_file(load_file(str(ctx.checkpoint)), str(path),
                  metadata={"sdrt.configs": text if text is not None else json.dumps(configs)})
        return ["export", path, d / "out"] if command == "export" else _generate(d, "-m", path)
    return make


def _config(path: str, value):
    def edit(c: dict):
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return edit


# --- command lines ---------------------------------------------------------------------------------

def _generate(d: Path, *args, prompt: str = "a cat") -> list:
    return ["generate", prompt, "--steps", "2", "-o", d / "outputs", *args]


def _values(*args):
    def make(ctx: Ctx, d: Path) -> list:
        return _generate(d, "-m", ctx.bundle, *args)
    return make


def cases() -> list[Case]:
    out = []
    for payload in _payloads(Path("canary")):
        for suffix, fmt in ((".ckpt", "zip"), (".pt", "legacy"), (".pth", "zip"), (".bin", "raw")):
            out.append(Case(f"pickle-{payload}{suffix}-{fmt}", "pickles", "refus",
                            _evil_checkpoint(payload, suffix, fmt, "generate")))
    out += [
        Case("pickle-export-ckpt", "pickles", "refus", _evil_checkpoint("exec", ".ckpt", "zip", "export")),
        Case("pickle-export-legacy-pt", "pickles", "refus", _evil_checkpoint("os-system", ".pt", "legacy", "export")),
        Case("pickle-diffusers-folder", "pickles", "refus", _evil_diffusers),
        Case("pickle-embedding-pt", "pickles", "refus", _evil_embedding(".pt", "zip")),
        # embeddings are read only from torch's zip format: others are refused unread
        Case("pickle-embedding-legacy-pt", "pickles", "not a zip-format torch file", _evil_embedding(".pt", "legacy")),
        Case("pickle-embedding-bin", "pickles", "not a zip-format torch file", _evil_embedding(".bin", "raw")),
        Case("pickle-embedding-zip-bin", "pickles", "refus", _evil_embedding(".bin", "zip")),
    ]
    # found by tools/fuzz_parsers.py: OverflowError and a numpy reshape error, before the fix
    out += [
        Case("embedding-infinite-shape", "fuzz", "malformed tensor",
             _bad_embedding('{"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 16]}}')),
        Case("embedding-overflowing-shape", "fuzz", "wrong size",
             _bad_embedding('{"t": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}}')),
        Case("embedding-infinite-offset", "fuzz", "malformed tensor",
             _bad_embedding('{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1e400]}}')),
        Case("manifest-nul-in-path", "fuzz", "components.unet.path",
             _manifest_case(_set("components.unet.path", "unet/model.onnx\0.txt"))),
    ]
    out += [Case(f"external-data-{t}", "external data", "", _external_data(t))
            for t in ("rel", "abs", "dev-zero", "symlink")]
    out += [
        Case("truncated-graph", "truncated", "", _truncated_graph),
        Case("missing-graph", "truncated", "incomplete", _missing_graph),
        Case("truncated-safetensors", "truncated", "model.safetensors", _truncated_checkpoint(0.5)),
        Case("truncated-safetensors-generate", "truncated", "model.safetensors", _truncated_checkpoint(0.5, "generate")),
        Case("truncated-safetensors-header", "truncated", "model.safetensors", _truncated_checkpoint(0.00002)),
        Case("empty-safetensors", "truncated", "model.safetensors", _truncated_checkpoint(0.0)),
        Case("huge-safetensors-header", "truncated", "model.safetensors", _huge_header),
        Case("truncated-ckpt", "truncated", "model.ckpt", _truncated_ckpt),
    ]
    other_unet = lambda ctx: str((ctx.bundle / "unet" / "model.onnx").resolve())
    out += [
        Case("manifest-not-json", "manifest", "sdrt.json", _manifest_case(None, raw=b"{not json")),
        Case("manifest-list", "manifest", "json object", _manifest_case(lambda m, c: [m])),
        Case("manifest-components-null", "manifest", "components", _manifest_case(_set("components", None))),
        Case("manifest-no-components", "manifest", "components", _manifest_case(_set("components", ...))),
        Case("manifest-no-unet", "manifest", "components.unet", _manifest_case(_set("components.unet", ...))),
        Case("manifest-no-scheduler", "manifest", "scheduler", _manifest_case(_set("scheduler", ...))),
        Case("manifest-vae-scale-0", "manifest", "vae_scale_factor", _manifest_case(_set("vae_scale_factor", 0))),
        Case("manifest-timesteps-0", "manifest", "num_train_timesteps",
             _manifest_case(_set("scheduler.num_train_timesteps", 0))),
        Case("manifest-beta-schedule", "manifest", "beta_schedule",
             _manifest_case(_set("scheduler.beta_schedule", "cosine-ish"))),
        Case("manifest-latent-channels-3", "manifest", "latent_channels", _manifest_case(_set("latent_channels", 3))),
        Case("manifest-newer-format", "manifest", "format version", _manifest_case(_set("format_version", 999))),
        Case("manifest-unet-absolute", "manifest", "components.unet.path",
             _manifest_case(_set("components.unet.path", other_unet))),
        Case("manifest-unet-dotdot", "manifest", "components.unet.path",
             _manifest_case(_set("components.unet.path", "../../x/unet/model.onnx"))),
        Case("manifest-token-embeddings-outside", "manifest", "token_embeddings",
             _manifest_case(_set("text_encoder.token_embeddings", "/etc/hostname"))),
    ]
    out += [
        Case("configs-not-json", "configs", "sdrt.configs", _configs_case(text="{unet")),
        Case("configs-a-list", "configs", "sdrt.configs", _configs_case(text="[1, 2]")),
        Case("configs-unet-string", "configs", "unet", _configs_case(_config("unet", "big"))),
        Case("configs-no-vae", "configs", "vae", _configs_case(_config("vae", ...))),
        Case("configs-negative-width", "configs", "unet.block_out_channels",
             _configs_case(_config("unet.block_out_channels", [-32, 64]))),
        Case("configs-sample-size-0", "configs", "unet.sample_size", _configs_case(_config("unet.sample_size", 0))),
        Case("configs-scheduler-string", "configs", "scheduler", _configs_case(_config("scheduler", "bogus"))),
        Case("configs-beta-schedule", "configs", "scheduler.beta_schedule",
             _configs_case(_config("scheduler.beta_schedule", "bogus"))),
        Case("configs-prediction-type", "configs", "scheduler.prediction_type",
             _configs_case(_config("scheduler.prediction_type", "x0"))),
        Case("configs-hidden-size", "configs", "text_encoder.hidden_size",
             _configs_case(_config("text_encoder.hidden_size", -1))),
        Case("configs-latent-channels-0", "configs", "vae.latent_channels",
             _configs_case(_config("vae.latent_channels", 0))),
        Case("configs-groups", "configs", "norm_num_groups", _configs_case(_config("unet.norm_num_groups", 7))),
        Case("configs-heads", "configs", "attention_head_dim", _configs_case(_config("unet.attention_head_dim", 3))),
        Case("configs-block-types", "configs", "down_block_types",
             _configs_case(_config("unet.down_block_types", ["DownBlock2D"]))),
        Case("configs-generate", "configs", "unet.sample_size",
             _configs_case(_config("unet.sample_size", -8), command="generate")),
    ]
    for name, expect, args in (
        ("width-0", "width must be a positive multiple of 8, got 0", ("-W", "0")),
        ("height-0", "height must be a positive multiple of 8, got 0", ("-H", "0")),
        ("width-7", "width must be a positive multiple", ("-W", "7")),
        ("width-negative", "width must be a positive multiple", ("-W", "-64")),
        ("width-huge", "needs at least", ("-W", "100000", "-H", "1024")),
        ("size-huge", "needs at least", ("-W", "100000", "-H", "100000")),
        ("steps-0", "steps", ("--steps", "0")),
        ("steps-negative", "steps", ("--steps", "-3")),
        ("cfg-nan", "cfg_scale must be a finite number", ("--cfg-scale", "nan")),
        ("cfg-inf", "cfg_scale must be a finite number", ("--cfg-scale", "inf")),
        ("sampler-unknown", "sampler", ("--sampler", "Euler z")),
        ("scheduler-unknown", "schedule", ("--scheduler", "Wobbly")),
        ("seed-2-64", "seed 18446744073709551616 is out of range", ("--seed", str(2**64))),
        ("seed-below-int64", "out of range", ("--seed", str(-2**63 - 1))),
        ("seed-batch-overflow", "seed 18446744073709551616 is out of range",
         ("--seed", str(2**64 - 1), "--batch-size", "2")),
        ("seed-ensd-overflow", "ensd", ("--seed", str(2**64 - 1), "--ensd", "31337")),
        ("subseed-2-64", "variation seed", ("--subseed", str(2**64), "--subseed-strength", "0.5")),
        ("subseed-strength-2", "variation seed strength", ("--subseed-strength", "2")),
        ("batch-size-0", "batch size", ("--batch-size", "0")),
        ("batch-count-0", "batch count", ("--batch-count", "0")),
        ("clip-skip-99", "clip skip", ("--clip-skip", "99")),
        ("clip-skip-0", "clip skip", ("--clip-skip", "0")),
        ("eta-nan", "eta must be a finite number", ("--eta", "nan")),
        ("vae-tile-size", "tile", ("--vae-tiling", "--vae-tile-size", "3")),
        ("device-unknown", "device", ("--device", "quantum")),
    ):
        out.append(Case(name, "values", expect, _values(*args)))
    return out


def write_corpus(root: Path, checkpoint: Path, bundle: Path) -> list[dict]:
    """Write every case's files under ``root`` (one folder each) and ``root/cases.json``."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for case in cases():
        d = root / case.name
        d.mkdir()
        ctx = Ctx(Path(checkpoint), Path(bundle), d / "canary.txt")
        ctx.canary.write_text(CANARY_TEXT)
        args = [str(a) for a in case.make(ctx, d)]
        records.append({**{k: v for k, v in asdict(case).items() if k != "make"}, "args": args, "dir": str(d),
                        "canary": str(ctx.canary)})
    (root / "cases.json").write_text(json.dumps(records, indent=1))
    return records


def run_cases(root: Path, names: list[str] | None = None) -> dict:
    """Run the cases of ``root/cases.json`` (all, or ``names``), each in a child forked from this
    process; ``root/results.json`` gets {name: {"rc", "stdout", "stderr"}}."""
    import signal

    import onnxruntime  # noqa: F401  (imported once, before the forks)
    import sdrt.export.write  # noqa: F401
    import torch  # noqa: F401

    from sdrt.cli import main

    results = {}
    for case in json.loads((root / "cases.json").read_text()):
        if names is not None and case["name"] not in names:
            continue
        d = Path(case["dir"])
        out, err = d / "stdout.txt", d / "stderr.txt"
        pid = os.fork()
        if pid == 0:  # the child: the CLI as `python -m sdrt.cli ARGS` runs it
            code = 1
            try:
                signal.alarm(300)
                os.environ["SDRT_CACHE"] = str(d / "cache")
                for fd, path in ((1, out), (2, err)):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                try:
                    main(case["args"], prog_name="sdrt")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                    code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        results[case["name"]] = {"rc": rc, "stdout": out.read_text(errors="replace"),
                                 "stderr": err.read_text(errors="replace")}
    (root / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--run", action="store_true", help="run the cases of ROOT/cases.json")
    parser.add_argument("--only", nargs="*", default=None, help="with --run: these cases only")
    a = parser.parse_args()
    if a.run:
        run_cases(a.root, a.only)
    else:
        if a.checkpoint is None or a.bundle is None:
            parser.error("writing the corpus needs --checkpoint and --bundle (the tiny model, see tests/conftest.py)")
        write_corpus(a.root, a.checkpoint, a.bundle)
