"""Losses: flow matching, masked/weighted flow loss, RefineAnything's boundary consistency loss,
RefGC-SR2's frequency loss. Latents are (B, C, h, w); masks (B, 1, H, W) at any resolution."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import images as IM
from .frequency import split as freq_split


def sample_t(
    rng: np.random.Generator, n: int, mode: str = "logit_normal", mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """Training times in (0, 1): logit-normal (SD3/FLUX training default) or uniform."""
    if mode == "uniform":
        return torch.from_numpy(rng.uniform(0, 1, n)).float()
    return torch.sigmoid(torch.from_numpy(rng.normal(mean, std, n)).float())


def noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (t = 1 is noise)."""
    t = t.view(-1, *[1] * (x0.ndim - 1)).to(x0)
    return (1 - t) * x0 + t * eps


def x0_estimate(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One-step clean estimate ẑ0 = x_t - t·v."""
    return x_t - t.view(-1, *[1] * (x_t.ndim - 1)).to(x_t) * v


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A (B, 1, H, W) pixel mask on the latent grid as its fractional coverage in [0, 1] (images.resize_mask)."""
    return IM.resize_mask(mask, hw, "coverage")


def boundary_band(mask: torch.Tensor, radius: int = 16) -> torch.Tensor:
    """Dilate(mask, r) - Erode(mask, r) with a square structuring element (pixels), (B, 1, H, W) in {0, 1}."""
    k = 2 * radius + 1
    m = (mask > 0.5).float()
    dil = F.max_pool2d(m, k, stride=1, padding=radius)
    ero = 1 - F.max_pool2d(1 - m, k, stride=1, padding=radius)
    return dil - ero


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean(ℓ ⊙ w) with per-location ℓ = Σ_channels (pred - target)², w broadcast over (B, 1, h, w)."""
    per_loc = ((pred.float() - target.float()) ** 2).sum(1, keepdim=True)
    return per_loc.mean() if weight is None else (per_loc * weight).mean()


def boundary_weight(mask: torch.Tensor, hw: tuple[int, int], alpha: float = 9.0, radius: int = 16) -> torch.Tensor:
    """RefineAnything's weight 1 + α·band on the latent grid (band computed in pixels, then resized)."""
    return 1 + alpha * resize_mask(boundary_band(mask, radius), hw)


def frequency_loss(
    z0_hat: torch.Tensor,
    z_gt: torch.Tensor,
    z_ref: torch.Tensor,
    mask: torch.Tensor,
    ref_mask: torch.Tensor | None = None,
    sigma: float = 1.0,
    w_lf: float = 1.0,
    w_hf: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """RefGC-SR2: L1 of LF(ẑ0) vs LF(z_HRGT) in the mask + channel-wise masked mean/std of HF(ẑ0) vs HF(z_HRRI)."""
    hw = z0_hat.shape[-2:]
    m = resize_mask(mask, hw)
    mr = resize_mask(ref_mask if ref_mask is not None else mask, hw)
    lf_hat, hf_hat = freq_split(z0_hat.float(), sigma)
    lf_gt, _ = freq_split(z_gt.float(), sigma)
    _, hf_ref = freq_split(z_ref.float(), sigma)
    l_lf = ((lf_hat - lf_gt).abs() * m).sum() / (m.sum() * z0_hat.shape[1]).clamp_min(1e-6)
    mu_h, sd_h = masked_stats(hf_hat, m)
    mu_r, sd_r = masked_stats(hf_ref, mr)
    l_hf = (mu_h - mu_r).abs().mean() + (sd_h - sd_r).abs().mean()
    return w_lf * l_lf + w_hf * l_hf, dict(l_lf=l_lf.detach(), l_hf=l_hf.detach())


def masked_stats(x: torch.Tensor, m: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise mean and std (B, C) of x (B, C, h, w) weighted by m (B, 1, h, w)."""
    w = m / m.sum((2, 3), keepdim=True).clamp_min(eps)
    mu = (x * w).sum((2, 3))
    var = (((x - mu[..., None, None]) ** 2) * w).sum((2, 3))
    return mu, (var + eps).sqrt()


def flow_matching_loss(
    bb, x0: torch.Tensor, contexts, prompt, t: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """E‖v_θ(x_t, t, contexts) - (ε - x0)‖² (optionally location-weighted) for one batch."""
    x_t = noisy(x0, eps, t)
    v = bb(x_t, t, contexts, prompt=prompt)
    return weighted_mse(v, eps - x0, weight) / x0.shape[1]
