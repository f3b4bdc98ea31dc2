"""The mini VAE recipe (stage 1 of the mini backbone): an AutoencoderKL trained on CPU with L1 + MSE + KL and a
patch-PCA warm start, then FLUX-style latent normalisation. A recipe on labkit.loop; `labkit.mini` runs it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import data as D
from . import images as IM
from . import models as M
from .loop import LoopConfig, Step, run_loop
from .metrics import psnr, ssim


@dataclass
class VAEConfig:
    """The mini VAE recipe (measured on 2 CPU cores) plus a PCA warm start."""

    crop: int = 48
    batch: int = 16
    text_frac: float = 0.35
    kl: float = 1e-6
    pca_warm: float = 0.3  # fraction of steps with the auxiliary 'match an 8x8-patch PCA code' loss
    eval_size: int = 128
    eval_n: int = 24


def patch_pca(images: torch.Tensor, factor: int = 8, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and top-k basis (D, k) of the factor×factor×3 patches of images (B, 3, H, W)."""
    x = rearrange(images, "b c (h p) (w q) -> (b h w) (c p q)", p=factor, q=factor)
    mu = x.mean(0)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    return mu, v[:k].T


def pca_code(images: torch.Tensor, mu: torch.Tensor, basis: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(B, 3, H, W) -> (B, k, H/f, W/f) patch-PCA coefficients."""
    h = images.shape[-2] // factor
    x = rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=factor, q=factor)
    return rearrange((x - mu) @ basis, "b (h w) k -> b k h w", h=h)


class VAEStep(nn.Module):
    """The VAE's training forward as one module (so the loop can prepare it): latents, reconstruction, KL,
    and optionally the decoder's output for a given PCA code (the warm start)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, code: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        post = self.vae.encode(x * 2 - 1).latent_dist
        z = post.mode()
        out = dict(z=z, rec=(self.vae.decode(z).sample + 1) / 2, kl=post.kl().mean() / x[0].numel())
        if code is not None:
            out["code_rec"] = (self.vae.decode(code.to(z.dtype)).sample + 1) / 2
        return out


def vae_eval(bb: M.Backbone, images: torch.Tensor, labels: list[str]) -> dict:
    """Held-out PSNR/SSIM of the VAE round trip vs bicubic x8 on the same images."""
    rec = torch.cat([bb.vae.decode(bb.vae.encode(x[None] * 2 - 1).latent_dist.mode()).sample for x in images])
    rec = ((rec + 1) / 2).clamp(0, 1).float()
    bic = IM.bicubic_draft(images, bb.preset.vae_factor)
    out = dict(
        vae_psnr=psnr(rec, images).mean().item(),
        bicubic_psnr=psnr(bic, images).mean().item(),
        vae_ssim=ssim(rec, images).mean().item(),
        bicubic_ssim=ssim(bic, images).mean().item(),
    )
    for kind in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == kind]
        out[f"vae_psnr_{kind}"] = psnr(rec[idx], images[idx]).mean().item()
        out[f"bicubic_psnr_{kind}"] = psnr(bic[idx], images[idx]).mean().item()
    return out


def train_vae(bb: M.Backbone, loop: LoopConfig, cfg: VAEConfig) -> dict:
    """Train the backbone's AutoencoderKL (L1 + MSE + KL, PCA warm start); set scaling/shift from latents."""
    vae = bb.vae.requires_grad_(True)
    f = bb.preset.vae_factor
    mu, basis = patch_pca(
        D.crop_batch(np.random.default_rng(loop.seed + 7), "train", 256, 32, cfg.text_frac),
        f,
        bb.preset.latent_channels,
    )
    scale = 1.0 / pca_code(D.crop_batch(np.random.default_rng(1), "train", 32, 32), mu, basis, f).std()
    ev_img, ev_lab = D.heldout_crops("val", cfg.eval_n, cfg.eval_size)

    def loss_fn(s: Step):
        x = s.shard(D.crop_batch(s.rng, "train", cfg.batch * s.world, cfg.crop, cfg.text_frac))
        w = max(0.0, 1 - s.step / max(1, cfg.pca_warm * loop.steps)) if cfg.pca_warm else 0.0
        code = pca_code(x, mu, basis, f) * scale if w > 0 else None  # warm start: latents near a patch-PCA code
        o = s.model(x, code)
        rec_loss = F.l1_loss(o["rec"].float(), x) + F.mse_loss(o["rec"].float(), x)
        loss = rec_loss + cfg.kl * o["kl"]
        logs = dict(rec=rec_loss.detach(), kl=o["kl"].detach())
        if code is not None:
            aux = F.mse_loss(o["z"].float(), code) + F.l1_loss(o["code_rec"].float(), x)
            loss = loss + w * aux
            logs["pca_aux"] = aux.detach()
        return loss, logs

    state = run_loop(loop, VAEStep(vae), loss_fn, lambda step: vae_eval(bb, ev_img, ev_lab), run_config=asdict(cfg))
    vae.requires_grad_(False)
    set_latent_stats(bb)
    return state


@torch.no_grad()
def set_latent_stats(bb: M.Backbone, n: int = 64, size: int = 128) -> dict:
    """FLUX-style latent normalisation: shift = mean, scaling = 1/std of the training latents."""
    x = D.crop_batch(np.random.default_rng(99), "train", n, size)
    z = torch.cat([bb.vae.encode(c[None] * 2 - 1).latent_dist.mode() for c in x])
    stats = dict(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    bb.vae.register_to_config(**stats)
    return stats
