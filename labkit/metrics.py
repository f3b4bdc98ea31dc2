"""RefineEval-style metrics: in-region and background MSE/PSNR/SSIM, whole image, HF fidelity.

Images are (B, 3, H, W) or (3, H, W) in [0, 1]; masks (B, 1, H, W) or (1, H, W) in {0, 1}.
Perceptual metrics (LPIPS, DINO, CLIP) run only from user-supplied local weights; otherwise they are
reported as unavailable (None), never replaced by a stand-in under their names.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .frequency import gaussian_kernel, radial_spectrum, split
from .images import resize
from .util import bootstrap_units


def _b(x: torch.Tensor) -> torch.Tensor:
    return (x[None] if x.ndim == 3 else x).float()


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image mean squared error (B,), over mask pixels when a mask is given."""
    a, b = _b(a), _b(b)
    err = (a - b) ** 2
    if mask is None:
        return err.flatten(1).mean(1)
    m = _b(mask).expand_as(err)
    return (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB for [0, 1] images (B,); identical images give 100 dB (capped)."""
    return (-10 * torch.log10(mse(a, b, mask) + eps)).clamp(max=100.0)


def ssim_map(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """SSIM map (B, 1, H, W) of Wang et al. 2004 (Gaussian window of σ 1.5: 11 taps, C1/C2 for range 1),
    channel-averaged."""
    a, b = _b(a), _b(b)
    c = a.shape[1]
    g = gaussian_kernel(sigma).to(a)  # the one Gaussian (frequency.gaussian_kernel: radius ceil(3σ) -> 11 taps at 1.5)
    size = len(g)
    k = (g[:, None] * g[None, :]).expand(c, 1, size, size)
    blur = lambda x: F.conv2d(F.pad(x, [size // 2] * 4, mode="reflect"), k, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    va, vb, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.mean(1, keepdim=True)


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM (B,), averaged over mask pixels when a mask is given."""
    s = ssim_map(a, b)
    if mask is None:
        return s.flatten(1).mean(1)
    m = _b(mask)
    return (s * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)


def hf_energy_ratio(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, sigma: float = 1.0
) -> torch.Tensor:
    """Σ m·HF(pred)² / Σ m·HF(target)² per image (B,): 1 = detail kept, < 1 = blurred, > 1 = over-sharpened."""
    _, hp = split(_b(pred), sigma)
    _, ht = split(_b(target), sigma)
    m = _b(mask) if mask is not None else torch.ones_like(hp[:, :1])
    return (hp**2 * m).flatten(1).sum(1) / (ht**2 * m).flatten(1).sum(1).clamp_min(1e-10)


def spectrum_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |log10 radial power(pred) - log10 radial power(target)| over frequency bins, per image (B,)."""
    a, b = _b(pred), _b(target)
    return torch.stack(
        [
            (torch.log10(radial_spectrum(x[None]) + 1e-10) - torch.log10(radial_spectrum(y[None]) + 1e-10)).abs().mean()
            for x, y in zip(a, b)
        ]
    )


def case_metrics(
    out: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    draft: torch.Tensor | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """THE per-case numbers every labkit evaluator reports, per image (B,), one meaning for each name:

    region_mse / region_psnr / region_ssim: output vs target inside the mask; region_hf: HF energy ratio
    in the mask (1 = the target's detail), region_hf_err = |log2 region_hf|; psnr / ssim: whole image vs
    target. With the draft (the input): mse_bg / ssim_bg = output vs *draft* outside the mask
    (preservation, RefineEval's MSE_bg). With a paste box: bg_box_mse / bg_box_maxabs = output vs draft
    outside the box (0 = bit-identical)."""
    y, gt, m = _b(out), _b(target), _b(mask).expand(_b(out).shape[0], -1, -1, -1)
    hf = hf_energy_ratio(y, gt, m)
    row = dict(
        region_mse=mse(y, gt, m),
        region_psnr=psnr(y, gt, m),
        region_ssim=ssim(y, gt, m),
        region_hf=hf,
        region_hf_err=torch.log2(hf.clamp_min(1e-6)).abs(),
        psnr=psnr(y, gt),
        ssim=ssim(y, gt),
    )
    if draft is not None:
        inp = _b(draft).expand_as(y)
        row.update(mse_bg=mse(y, inp, 1 - m), ssim_bg=ssim(y, inp, 1 - m))
        if box is not None:
            x0, y0, x1, y1 = box
            outside = torch.ones_like(m)
            outside[..., y0:y1, x0:x1] = 0
            row["bg_box_mse"] = mse(y, inp, outside) if outside.sum() else torch.zeros(y.shape[0])
            row["bg_box_maxabs"] = ((y - inp).abs() * outside).flatten(1).amax(1)
    return row


def region_psnr(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Region PSNR (dB) of one (3, H, W) output against its target inside the mask (case_metrics' region_psnr)."""
    return float(case_metrics(out, target, mask)["region_psnr"][0])


def case_row(
    out: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    draft: torch.Tensor | None = None,
    box: tuple[int, int, int, int] | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """case_metrics of one image (3, H, W) as plain floats (a table row), names optionally prefixed."""
    return {prefix + k: float(v[0]) for k, v in case_metrics(out, target, mask, draft, box).items()}


def perceptual_unavailable(name: str) -> dict:
    """How a perceptual metric without local weights is reported: unavailable, with what to supply."""
    return dict(
        value=None,
        available=False,
        note=f"{name} needs local weights (pass a local path); none can be downloaded here, so it is not reported",
    )


class FeatureSimilarity:
    """Cosine similarity of image embeddings from a *local* transformers vision model (CLIP or DINOv2).

    `FeatureSimilarity("/models/clip-vit-base-patch32")` — nothing is downloaded; a missing folder is an
    error naming the path. CLIP uses the projected image embedding, DINOv2 the CLS token."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoConfig  # heavy: imported where used

        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"no local model folder at {path}: download e.g. openai/clip-vit-base-patch32 or "
                "facebook/dinov2-base on a machine with access and pass its folder"
            )
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        self.kind = "clip" if cfg.model_type.startswith("clip") else cfg.model_type
        if self.kind == "clip":  # a full CLIP folder or a vision-only one
            from transformers import CLIPVisionModelWithProjection as Model

            size = getattr(cfg, "vision_config", cfg).image_size
        else:
            from transformers import AutoModel as Model

            size = getattr(cfg, "image_size", 224)
        self.model = Model.from_pretrained(path, local_files_only=True).to(device).eval()
        self.size, self.device = size, device
        # CLIP's and ImageNet's normalisation constants
        mean, std = (
            ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))
            if self.kind == "clip"
            else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        )
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit-norm embeddings."""
        x = ((resize(_b(images), self.size) - self.mean) / self.std).to(self.device)
        out = self.model(pixel_values=x)
        e = out.image_embeds if self.kind == "clip" else out.last_hidden_state[:, 0]
        return F.normalize(e.float(), dim=-1).cpu()

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image cosine similarity (B,)."""
        return (self.embed(a) * self.embed(b)).sum(-1)


def bootstrap_ci(x: np.ndarray, n: int = 2000, seed: int = 0, level: float = 0.95, groups=None) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of x; with groups (e.g. scene ids) whole groups are resampled."""
    x = bootstrap_units(x, groups)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
