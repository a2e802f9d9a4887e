"""Train sdrt's embedded default model: a tiny SD 1.x (AutoencoderKL + UNet2DConditionModel + CLIP
text encoder on the real CLIP BPE vocabulary) on procedurally drawn shapes (tools/shapes.py).

    python -m tools.train_default_model --seed 0 --out models/sdrt-shapes-v1.safetensors \\
        --bundle runtime/data/default_model

Deterministic for a seed and thread count: all data comes from seeded generators, torch uses
a fixed number of threads. Stages:

1. VAE: reconstruction (L1 + L2) with a small KL term, trained first on 64x64 crops of the
   128x128 scenes (the autoencoder is convolutional: a quarter of the cost per image), then
   fine-tuned on whole scenes, whose GroupNorm statistics differ from a crop's. Its ``scaling_factor``
   is set to 1 / std of the encoded latents, so the UNet
   sees unit-variance latents as SD's 0.18215 gives SD's VAE.
2. UNet + text encoder from scratch, jointly, with SD 1.x's objective: eps prediction on the
   scaled_linear 0.00085-0.012 1000-step schedule; 10% of captions dropped to "" so
   classifier-free guidance works; an exponential moving average of the weights is kept.
   Phase 1 learns to draw; its fp16 checkpoint is saved. Phase 2 continues from it to teach the
   captions: pyramid (multi-resolution) noise, each sample's loss weighted by 1/SNR clipped to
   [1, 50], and a 4x learning rate on the text path (text encoder and the UNet's
   cross-attention). Phase 1 alone, on white noise, draws clean shapes but ignores the caption:
   the scene's colours and outline stay visible in the low frequencies of even the noisiest
   latents, so the model reads them there instead of from the text (see ``train_unet``).
3. Save the LDM/A1111-layout checkpoint in fp16 (with its configs in the header) and export
   the bundle from that file, through the same import a user's checkpoint takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools import shapes

log = logging.getLogger("train")


def configs_for_default_model() -> dict:
    from sdrt.export.tiny import scaled_sd1_configs

    return scaled_sd1_configs(unet_channels=(32, 64, 64), unet_layers=1, attention_heads=4, context_dim=32,
                              vae_channels=(16, 32, 32, 32), vae_layers=1, groups=8, text_layers=2,
                              text_heads=2, text_intermediate=128, sample_size=16)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[n, H, W, 3] uint8 -> [n, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, steps: int, batch: int, seed: int, lr: float = 1e-3, crop: int | None = 64) -> None:
    """Reconstruction training on random scenes, on ``crop``-pixel crops or whole images (None)."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        scenes = [shapes.random_scene(rng) for _ in range(batch)]
        images = np.stack([shapes.draw(s) for s in scenes])
        if crop:
            ox, oy = rng.integers(0, shapes.SIZE - crop, size=2)
            images = images[:, oy:oy + crop, ox:ox + crop]
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.time() - t0)
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int) -> tuple[torch.Tensor, list[str], float]:
    """Latent means of ``n`` scenes and their captions; the latents' std for the scaling factor."""
    images, scenes = shapes.dataset(n, seed)
    means = torch.cat([vae.encode(to_tensor(images[i:i + 64])).latent_dist.mean for i in range(0, n, 64)])
    return means, [s.caption() for s in scenes], float(means.std())


def token_ids(captions: list[str]) -> torch.Tensor:
    """[n, 77] ids, framed and padded exactly as the runtime frames a one-chunk prompt."""
    from sdrt.runtime.text.encoder import make_chunks
    from sdrt.runtime.text.tokenizer import ClipTokenizer

    tok = ClipTokenizer.default()
    rows = []
    for c in captions:
        (chunk,) = make_chunks([(tok.encode(c), 1.0)], bos=tok.bos_id, eos=tok.eos_id, comma=None)
        rows.append(chunk.tokens)
    return torch.tensor(rows)


def pyramid_noise(shape: tuple[int, ...], g: torch.Generator, discount: float) -> torch.Tensor:
    """Gaussian noise plus bilinearly upsampled noise at 1/2, 1/4, ... of the side (down to 1x1),
    level i weighted ``discount ** i``, rescaled to unit variance per sample ("pyramid" or
    multi-resolution noise). Used in training only: sampling starts from plain white noise."""
    b, c, h, w = shape
    eps = torch.randn(shape, generator=g)
    side, level = h, 0
    while side > 1:
        side //= 2
        level += 1
        coarse = torch.randn(b, c, side, side, generator=g)
        eps = eps + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** level
    return eps / eps.std(dim=(1, 2, 3), keepdim=True)


def train_unet(unet, text_encoder, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
               alphas_cumprod: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 5e-4,
               ema_decay: float = 0.995, text_lr_mult: float = 1.0, pyramid: float | None = None,
               max_weight: float | None = None):
    """Eps-prediction training; ``text_lr_mult`` scales the learning rate of the text encoder and
    of the UNet's cross-attention (``attn2``) against the rest.

    ``pyramid``: train on pyramid noise with that discount instead of white noise. ``max_weight``:
    weight each sample's loss by 1/SNR(t) clipped to [1, max_weight] (normalised over the batch),
    the x0-error weighting at high noise. Both make the caption matter: with white noise the
    scene's flat colours and outline stay readable in the low frequencies of even the noisiest
    training latents, so a model learns to read them there instead of from the text, and at
    sampling time takes them from the random starting noise.
    """
    g = torch.Generator().manual_seed(seed)
    text_path = [p for n, p in unet.named_parameters() if ".attn2." in n] + list(text_encoder.parameters())
    text_ids = {id(p) for p in text_path}
    rest = [p for p in unet.parameters() if id(p) not in text_ids]
    params = rest + text_path
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": text_path, "lr": lr * text_lr_mult}],
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * text_lr_mult], total_steps=steps,
                                                pct_start=0.05)
    ema = [p.detach().clone() for p in params]
    unet.train()
    text_encoder.train()
    t0 = time.time()
    n = latents.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = latents[idx]
        batch_ids = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1  # caption dropout: unconditional training
        batch_ids[drop] = empty_ids
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=g)
        eps = pyramid_noise(x0.shape, g, pyramid) if pyramid else torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        context = text_encoder(batch_ids).last_hidden_state
        if max_weight:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            w = torch.clamp(1 / snr, min=1.0, max=max_weight)
            per_sample = ((unet(xt, t, context).sample - eps) ** 2).mean(dim=(1, 2, 3))
            loss = (w * per_sample).mean() / w.mean()
        else:
            loss = F.mse_loss(unet(xt, t, context).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        if step % 50 == 0 or step == steps - 1:
            log.info("unet step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.time() - t0)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train sdrt's embedded default model (see the module docstring).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-steps", type=int, default=700)
    ap.add_argument("--vae-batch", type=int, default=12)
    ap.add_argument("--vae-full-steps", type=int, default=300, help="fine-tuning steps on whole 128x128 scenes")
    ap.add_argument("--vae-full-batch", type=int, default=6)
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--unet2-steps", type=int, default=1500,
                    help="phase 2: pyramid noise, high-noise weighting, text path at a higher rate")
    ap.add_argument("--text-lr-mult", type=float, default=4.0)
    ap.add_argument("--pyramid", type=float, default=0.8, help="phase 2's pyramid-noise discount")
    ap.add_argument("--max-weight", type=float, default=50.0, help="phase 2's clip of the 1/SNR loss weight")
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--dataset", type=int, default=6144, help="scenes encoded for the UNet stage")
    ap.add_argument("--out", default="models/sdrt-shapes-v1.safetensors")
    ap.add_argument("--bundle", default="runtime/data/default_model")
    ap.add_argument("--work", default="build/default_model", help="intermediate files (VAE weights)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from sdrt.export import convert
    from sdrt.export.tiny import random_modules
    from sdrt.export.write import export_checkpoint, save_checkpoint
    from sdrt.runtime.sampling.schedules import alphas_cumprod

    configs = configs_for_default_model()
    unet, vae, text_encoder = random_modules(configs, seed=args.seed)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # Each VAE phase is saved, keyed by its seed and step counts, so a run can resume after it
    for name, steps, batch, crop, lr in (("crops", args.vae_steps, args.vae_batch, 64, 1e-3),
                                         ("full", args.vae_full_steps, args.vae_full_batch, None, 3e-4)):
        vae_file = work / (f"vae-seed{args.seed}-{args.vae_steps}.pt" if name == "crops"
                           else f"vae-seed{args.seed}-{args.vae_steps}-full{steps}.pt")
        if vae_file.exists():
            vae.load_state_dict(torch.load(vae_file, weights_only=True))
            log.info("VAE (%s) loaded from %s", name, vae_file)
        else:
            train_vae(vae, steps, batch, args.seed + (0 if name == "crops" else 10), lr=lr, crop=crop)
            torch.save(vae.state_dict(), vae_file)
    vae.eval().requires_grad_(False)

    latents, captions, std = encode_dataset(vae, args.dataset, args.seed + 1)
    scale = 1.0 / std
    configs["vae"]["scaling_factor"] = round(scale, 5)
    log.info("latent std %.4f -> scaling_factor %.5f", std, scale)
    sched = configs["scheduler"]
    ac = torch.from_numpy(alphas_cumprod(sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"],
                                         sched["beta_schedule"])).float()
    ids, empty = token_ids(captions), token_ids([""])[0]
    scaled = latents * configs["vae"]["scaling_factor"]

    def save(path: Path) -> None:
        components = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_encoder.state_dict()}
        ldm = {k: v.detach().to(torch.float16) for k, v in convert.diffusers_to_ldm(components, configs).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ldm, configs, path)

    phase1 = work / f"unet-phase1-seed{args.seed}-{args.unet_steps}.safetensors"
    if not phase1.exists():
        train_unet(unet, text_encoder, scaled, ids, empty, ac, args.unet_steps, args.unet_batch, args.seed + 2)
        save(phase1)
    # Phase 2 starts from the saved fp16 phase-1 weights (so a resumed run continues identically)
    from sdrt.export.write import load_checkpoint

    _, components, _ = load_checkpoint(phase1)
    unet, _, text_encoder = convert.build_modules(configs, components)
    unet.requires_grad_(True)
    text_encoder.requires_grad_(True)
    train_unet(unet, text_encoder, scaled, ids, empty, ac, args.unet2_steps, args.unet_batch, args.seed + 5,
               lr=3e-4, text_lr_mult=args.text_lr_mult, pyramid=args.pyramid, max_weight=args.max_weight)
    out = Path(args.out)
    save(out)
    log.info("checkpoint %s (%.1f MB)", out, out.stat().st_size / 2**20)
    bundle = export_checkpoint(out, args.bundle, overwrite=True)
    size = sum(p.stat().st_size for p in Path(bundle).rglob("*") if p.is_file())
    log.info("bundle %s (%.1f MB)", bundle, size / 2**20)
    (work / "train-info.json").write_text(json.dumps({"seed": args.seed, "latent_std": std, "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
