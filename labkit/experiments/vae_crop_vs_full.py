"""Notebook 03_vae_crop_vs_full's experiment code (RefineAnything Fig. 3, measured): does cropping and
upsampling before the VAE reconstruct a region better than encoding the full image?"""

from __future__ import annotations

import numpy as np
import torch

from ..focus import Box, crop, snap_size
from ..images import resize
from ..metrics import hf_energy_ratio, psnr, spectrum_distance, ssim


def random_box(rng, size: int, frac: float, multiple: int = 1) -> Box:
    """A square box covering ≈frac of a size×size image at a random position."""
    side = int(np.clip(round(np.sqrt(frac) * size), 4, size))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    return x0, y0, x0 + side, y0 + side


@torch.no_grad()
def crop_roundtrip(bb, image: torch.Tensor, box: Box, upsample: float | str) -> torch.Tensor:
    """VAE round trip of the box crop upsampled by `upsample` (or to the full working area with 'work'),
    resized back to the box: (3, box_h, box_w)."""
    c = crop(image, box)
    h, w = c.shape[-2:]
    area = image.shape[-1] * image.shape[-2] if upsample == "work" else int(h * w * float(upsample) ** 2)
    hw = snap_size(h, w, area, bb.multiple)
    rec = bb.roundtrip(resize(c, hw)[None])[0].cpu()
    return resize(rec, (h, w))


@torch.no_grad()
def crop_vs_full(bb, images: torch.Tensor, labels: list[str], fracs, upsamples, seed: int = 0) -> list[dict]:
    """Region PSNR/SSIM/HF ratio of full-image encoding vs crop+upsample encoding, for every image,
    region fraction and upsampling factor; one row per (image, frac, upsample)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels)):
        full = bb.roundtrip(img[None])[0].cpu()
        for frac in fracs:
            box = random_box(rng, img.shape[-1], frac)
            target, full_c = crop(img, box)[None], crop(full, box)[None]
            base = dict(
                psnr=psnr(full_c, target).item(),
                ssim=ssim(full_c, target).item(),
                hf=hf_energy_ratio(full_c, target).item(),
                spec=spectrum_distance(full_c, target).item(),
            )
            for u in upsamples:
                rec = crop_roundtrip(bb, img, box, u)[None]
                rows.append(
                    dict(
                        image=i,
                        content=label,
                        frac=frac,
                        upsample=str(u),
                        box=box,
                        full_psnr=base["psnr"],
                        crop_psnr=psnr(rec, target).item(),
                        full_ssim=base["ssim"],
                        crop_ssim=ssim(rec, target).item(),
                        full_hf=base["hf"],
                        crop_hf=hf_energy_ratio(rec, target).item(),
                        full_spec=base["spec"],
                        crop_spec=spectrum_distance(rec, target).item(),
                    )
                )
    for r in rows:
        r["gain_psnr"] = r["crop_psnr"] - r["full_psnr"]
        r["gain_ssim"] = r["crop_ssim"] - r["full_ssim"]
        r["gain_hf"] = abs(1 - r["full_hf"]) - abs(1 - r["crop_hf"])  # > 0: crop's HF energy closer to the target's
        r["gain_spec"] = r["full_spec"] - r["crop_spec"]  # > 0: crop's spectrum closer to the target's
    return rows
