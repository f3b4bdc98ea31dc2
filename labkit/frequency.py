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


def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """x (1, C, H, W) sampled at (u + dx, v + dy) px for each of N shifts dx, dy (N,): (N, C, H, W), bilinear,
    the border repeated."""
    n, (h, w) = len(dx), x.shape[-2:]
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = 1, 1, 2 * dx / w, 2 * dy / h
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False)


def witness_shift(draft: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor, ring: torch.Tensor | None = None,
                  reach: float = 3.0, step: float = 0.5) -> dict:  # fmt: skip
    """The translation (dx, dy) px of the aligned reference (3, H, W) whose low frequencies best match the draft
    (3, H, W) inside mask (1, H, W), the draft read as a blurred target (lowpass_witness): searched on a `step` grid
    within `reach` px under each of WITNESS_SIGMAS. shift_gain: the low-pass error unshifted over that at the best
    shift (1: the draft asks for no correction; a paste a few px off a non-planar surface gives 2-6). With `ring`
    (1, H, W, a band just outside the region, within ~reach + 3 * 6 px of it, where the draft is intact): ring_ratio,
    the sharp error there shifted over unshifted (> 1: the surroundings refuse the shift, as on a plane registered
    right; <= 1: they move with it, as a smooth non-planar displacement does)."""
    m = mask[0] > 0.5
    if not m.any():
        return dict(dx=0.0, dy=0.0, shift_gain=1.0) | ({} if ring is None else dict(ring_ratio=1.0))
    ys, xs = m.nonzero(as_tuple=True)
    pad = int(reach + 3 * max(WITNESS_SIGMAS)) + 2  # the blurs and the shifts see real pixels, not the crop's edge
    y0, x0 = max(int(ys.min()) - pad, 0), max(int(xs.min()) - pad, 0)
    y1, x1 = int(ys.max()) + pad + 1, int(xs.max()) + pad + 1
    d, a = draft[None, :, y0:y1, x0:x1].float(), aligned[None, :, y0:y1, x0:x1].float()
    mm = m[None, None, y0:y1, x0:x1].float()
    g = torch.arange(-reach, reach + step / 2, step)
    dy, dx = (t.flatten() for t in torch.meshgrid(g, g, indexing="ij"))  # (N,) candidate shifts
    zero = int(((dx == 0) & (dy == 0)).nonzero()[0, 0])
    err = torch.stack([  # (sigmas, N): mean square of (shifted, blurred reference - draft) in the region
        torch.cat([((translate(lowpass(a, s), dx[i:i + 32], dy[i:i + 32]) - d) ** 2 * mm).mean((1, 2, 3))
                   for i in range(0, len(dx), 32)])
        for s in WITNESS_SIGMAS
    ])  # fmt: skip
    best = int(err.min(0).values.argmin())
    gain = float((err[:, zero].min() + 1e-9) / (err[:, best].min() + 1e-9))  # 1 when the best is no shift
    out = dict(dx=float(dx[best]), dy=float(dy[best]), shift_gain=round(gain, 4))
    if ring is not None:  # the same shift read on the ring, unblurred: (2,) errors unshifted and shifted
        rr = ring[None, :, y0:y1, x0:x1].float()
        e = ((translate(a, dx[[zero, best]], dy[[zero, best]]) - d) ** 2 * rr).mean((1, 2, 3))
        out["ring_ratio"] = round(float((e[1] + 1e-9) / (e[0] + 1e-9)), 4)
    return out


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
