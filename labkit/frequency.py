"""Frequency analysis (RefGC-SR2): Gaussian LF/HF split of latent grids and token sequences, radial
spectra, band energies, and per-block hidden-state capture with forward hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ceil(3σ)."""
    r = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def lowpass(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (a constant field is unchanged)."""
    if sigma <= 0:
        return x
    g = gaussian_kernel(sigma).to(x)
    c, r = x.shape[1], len(g) // 2
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def split(x: torch.Tensor, sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(LF, HF) with LF = Gaussian low-pass and HF = x - LF, so LF + HF == x exactly."""
    lf = lowpass(x, sigma)
    return lf, x - lf


def tokens_to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Hidden states (B, h*w, D) of one image's packed tokens -> (B, D, h, w) grid (h, w = token grid)."""
    return rearrange(tokens, "b (h w) d -> b d h w", h=h, w=w)


def split_tokens(tokens: torch.Tensor, h: int, w: int, sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LF/HF split of a token sequence on its 2-D grid; returns (B, D, h, w) each."""
    return split(tokens_to_grid(tokens.float(), h, w), sigma)


def radial_spectrum(x: torch.Tensor, bins: int | None = None) -> torch.Tensor:
    """Mean power per radial frequency bin (bins,), averaged over batch and channels of (B, C, H, W)."""
    x = x.float() - x.float().mean((-2, -1), keepdim=True)
    p = torch.fft.fftshift(torch.fft.fft2(x, norm="ortho").abs() ** 2, dim=(-2, -1)).mean((0, 1))
    h, w = p.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = torch.sqrt((yy / (h / 2)) ** 2 + (xx / (w / 2)) ** 2)  # 1.0 = Nyquist along an axis
    bins = bins or min(h, w) // 2
    idx = (r / r.max() * bins).long().clamp(max=bins - 1).flatten()
    return torch.zeros(bins).index_add_(0, idx, p.flatten()) / torch.bincount(idx, minlength=bins).clamp_min(1)


def region_energy(x: torch.Tensor, m: torch.Tensor) -> float:
    """Mean square of x (B, C, H, W) over the pixels where m (B, 1, H, W) is 1, and over channels."""
    return float((x**2 * m).sum() / (m.sum() * x.shape[1]).clamp_min(1))


WITNESS_SIGMAS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)  # the blurs a draft is tried under (px)


def lowpass_witness(draft: torch.Tensor, paste: torch.Tensor, mask: torch.Tensor) -> dict:
    """Read the draft (3, H, W) as a blurred copy of the target (lost detail: ×4 low-res, smear) and test the paste
    against it inside mask (1, H, W). fine_share: the draft's detail finer than σ = 1 over the paste's (a blurred
    draft has little); sigma: the blur under which the paste best matches the draft; gap: that mismatch (the
    paste's own error at the draft's scale, if the draft is a blurred target) over the detail the paste adds
    beyond it (what the draft lacks), gap > 1: the paste gets wrong more than it adds; corr: the correlation of the
    draft with the paste so blurred (a blurred copy of the same content correlates; a region redrawn flat does not)."""
    m = (mask > 0.5).float()[None]  # (1, 1, H, W)
    d, p = draft[None].float(), paste[None].float()
    fine = region_energy(d - lowpass(d, 1.0), m) / max(region_energy(p - lowpass(p, 1.0), m), 1e-12)
    lf, sigma = min(((lowpass(p, s), s) for s in WITNESS_SIGMAS), key=lambda f: region_energy(f[0] - d, m))
    miss, detail = region_energy(lf - d, m), region_energy(p - lf, m)  # at σ; the paste's detail beyond σ
    sel = m.expand_as(d) > 0
    corr = float(torch.corrcoef(torch.stack([lf[sel], d[sel]]))[0, 1]) if sel.sum() > 1 else 0.0
    corr = corr if corr == corr else 0.0  # a flat region: no correlation (nan)
    return dict(fine_share=round(fine, 4), sigma=sigma, gap=round(miss / max(detail, 1e-12), 4), corr=round(corr, 4))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of flattened tensors (B,)."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


# ------------------------------------------------------------------------------------------------
# hidden states per block
@contextlib.contextmanager
def capture_hidden(transformer, n_target: int, n_text: int | None = None) -> Iterator[dict]:
    """Record each block's output image tokens of the target (first n_target image tokens).

    Double-stream blocks return (encoder_hidden_states, hidden_states); single-stream blocks in
    diffusers >= 0.35 return the same pair (older ones return one [text | image] tensor, handled via
    n_text). Yields a dict name -> list of (B, n_target, D) tensors, one per forward call; the hooks are
    removed on exit.
    """
    store: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name):
        def fn(module, args, output):
            if isinstance(output, tuple):
                img = output[1]
            else:  # [text | image] concatenated
                img = output[:, n_text:] if n_text is not None else output
            store.setdefault(name, []).append(img[:, :n_target].detach().float().cpu())

        return fn

    for name in block_names(transformer):
        handles.append(transformer.get_submodule(name).register_forward_hook(hook(name)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def block_names(transformer) -> list[str]:
    """Names in depth order, matching capture_hidden's keys."""
    return [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))
    ]
