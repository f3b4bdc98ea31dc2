"""Align as a warp (beyond Refine-by-Align's box): register the reference into the draft's frame.

Correspondences come from anywhere outside the region (the region is what is wrong in the draft): SIFT keypoints
matched with a ratio test and fitted by RANSAC (scikit-image), then refined directly on the pixels (a homography
that minimises the photometric error, with a per-channel gain and bias for the reference's change of light; once it
holds, the light change is refitted as a per-channel cubic tone curve on the same pixels: gamma is not a gain).
Two scopes: **scene** (the reference shares the draft's background: refined on everything outside the region) and,
when that does not verify, **object** (a product shot: refined on the ring around the region with a robust loss,
then a smooth non-rigid flow for a curved surface). The warped reference is cropped by the same focus box as the
draft, so the editor's contexts line up. A fit that does not verify (too few inliers, too little overlap, a large
fit error, a fit that drifted from its matches) is reported with the reason, and the caller falls back to the M*
box crop. Images larger than REGISTRATION_BUDGET pixels are registered downscaled and the warp mapped back.

Homographies map reference pixels (x, y, 1) to draft pixels, in pixel units (x right, y down).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import color, feature, measure
from skimage import transform as sktf

from .focus import seam_mask
from .images import resize, resize_mask, to_numpy


@dataclass
class Registration:
    """The reference -> draft homography and how well it fits."""

    matrix: np.ndarray  # (3, 3), reference pixel -> draft pixel
    ok: bool  # good enough to use (else fall back to the box)
    inliers: int  # RANSAC inliers among the matches outside the region
    matches: int
    fit_error: float  # RMS photometric error where it was fitted (scene or ring), relative to the draft's spread there
    reason: str = ""  # why it was refused, when it was
    gain: np.ndarray = field(
        default_factory=lambda: np.ones(3)
    )  # per-channel light change: draft ≈ gain·(warped - mean) + mean'
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))  # draft ≈ gain·warped + offset
    scope: str = "scene"  # scene: fitted on everything outside the region; object: on the ring around it
    flow: np.ndarray | None = None  # (2, H, W) non-rigid correction (x, y) in reference px, added after the homography
    tone: np.ndarray | None = None  # (3, TONE_DEGREE + 1) per-channel tone curve draft ≈ Σ_j tone[c, j]·warped^j
    tone_range: np.ndarray | None = None  # (3, 2) the warped values it was fitted on (beyond them: the gain's slope)

    def describe(self) -> dict:
        """What the output's info records."""
        return dict(
            used="warp" if self.ok else "box",
            inliers=self.inliers,
            matches=self.matches,
            fit_error=round(self.fit_error, 4),
            reason=self.reason,
            scope=self.scope,
            nonrigid=self.flow is not None,
            tone=self.tone is not None,
        )


def _keypoints(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints (N, 2) as (row, col) and descriptors; empty when the image has no texture."""
    det = feature.SIFT(upsampling=2, n_octaves=max(1, min(4, int(np.log2(min(gray.shape) / 16)))))
    try:
        det.detect_and_extract(gray)
    except RuntimeError:  # skimage raises when no keypoint is found
        return np.zeros((0, 2)), np.zeros((0, 128), np.uint8)
    return det.keypoints, det.descriptors


def feature_fit(draft: np.ndarray, reference: np.ndarray, outside: np.ndarray, seed: int = 0):
    """RANSAC homography (or similarity, with few matches) from SIFT matches whose draft point lies outside
    the region: (sktf transform or None, inliers, matches)."""
    k1, d1 = _keypoints(color.rgb2gray(draft))
    k2, d2 = _keypoints(color.rgb2gray(reference))
    if len(k1):
        keep = outside[
            k1[:, 0].astype(int).clip(0, outside.shape[0] - 1), k1[:, 1].astype(int).clip(0, outside.shape[1] - 1)
        ]
        k1, d1 = k1[keep], d1[keep]
    if len(k1) < 3 or len(k2) < 3:
        return None, 0, 0
    m = feature.match_descriptors(d1, d2, cross_check=True, max_ratio=0.8)
    if len(m) < 3:
        return None, 0, len(m)
    src, dst = k2[m[:, 1]][:, ::-1], k1[m[:, 0]][:, ::-1]  # (x, y): reference -> draft
    kind, n = (sktf.ProjectiveTransform, 4) if len(m) >= 8 else (sktf.SimilarityTransform, 2)
    model, inl = measure.ransac((src, dst), kind, min_samples=n, residual_threshold=2.0, max_trials=1000, rng=seed)
    if model is None or inl is None:
        return None, 0, len(m)
    model.inlier_points = (src[inl], dst[inl])  # (x, y) reference -> draft: what a refined fit must still agree with
    return model, int(inl.sum()), len(m)


def reference_coords(h_mat: torch.Tensor, hw: tuple[int, int], flow: torch.Tensor | None = None) -> torch.Tensor:
    """(H·W, 2) the reference pixel (x, y) each draft pixel samples: H^-1(draft pixel) + flow (2, H, W) if given."""
    h, w = hw
    ys, xs = torch.meshgrid(torch.arange(h, dtype=h_mat.dtype), torch.arange(w, dtype=h_mat.dtype), indexing="ij")
    p = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3) @ torch.linalg.inv(h_mat).T  # draft px -> ref px
    p = p[:, :2] / p[:, 2:].clamp_min(1e-6)
    return p if flow is None else p + flow.to(p).reshape(2, -1).T


def _grid(
    h_mat: torch.Tensor, hw: tuple[int, int], ref_hw: tuple[int, int], flow: torch.Tensor | None = None
) -> torch.Tensor:
    """grid_sample grid (1, H, W, 2) that samples the reference at H^-1(draft pixel) (+ flow)."""
    h, w = hw
    p = reference_coords(h_mat, hw, flow)
    rh, rw = ref_hw
    g = torch.stack([(p[:, 0] + 0.5) / rw * 2 - 1, (p[:, 1] + 0.5) / rh * 2 - 1], -1)
    return g.reshape(1, h, w, 2)


def warp_reference(
    reference: torch.Tensor, matrix: np.ndarray, hw: tuple[int, int], flow: np.ndarray | None = None
) -> torch.Tensor:
    """The reference (3, h, w) warped into the draft's frame (3, H, W) by the homography (and a registration's
    non-rigid flow); pixels that fall outside it repeat its border."""
    fl = None if flow is None else torch.as_tensor(flow, dtype=torch.float64)
    g = _grid(torch.as_tensor(matrix, dtype=torch.float64), hw, tuple(reference.shape[-2:]), fl).float()
    return F.grid_sample(reference[None].float(), g, mode="bilinear", padding_mode="border", align_corners=False)[
        0
    ].clamp(0, 1)


def _inside(h_mat: torch.Tensor, hw: tuple[int, int], ref_hw: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) 1 where the draft pixel's preimage lies inside the reference (the rest is padding)."""
    g = _grid(h_mat, hw, ref_hw)[0]
    return ((g.abs() <= 1).all(-1)).float()[None]


def _gain_offset(warped: torch.Tensor, draft: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-channel least squares draft ≈ a·warped + b: (a, b), each (3, 1, 1)."""
    sw = w.sum().clamp_min(1)
    mw, md = (warped * w).sum((-2, -1), keepdim=True) / sw, (draft * w).sum((-2, -1), keepdim=True) / sw
    a = ((warped - mw) * (draft - md) * w).sum((-2, -1), keepdim=True) / (
        ((warped - mw) ** 2 * w).sum((-2, -1), keepdim=True) + 1e-6
    )
    return a, md - a * mw


TONE_DEGREE = 3  # the reference's change of light as a per-channel cubic tone curve (gamma, exposure, white balance)


def fit_tone(
    warped: torch.Tensor, draft: torch.Tensor, w: np.ndarray, degree: int = TONE_DEGREE, min_pixels: int = 64
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel polynomial tone curve draft ≈ Σ_j c_j·warped^j, least squares on the pixels w (H, W) of the
    warped reference (3, H, W): (coefficients (3, degree + 1), the fitted range of warped values (3, 2)); None when
    fewer than min_pixels."""
    if int(w.sum()) < min_pixels:
        return None
    x, y = warped.double().numpy()[:, w], draft.double().numpy()[:, w]  # (3, N)
    fit = lambda xc, yc: np.linalg.lstsq(np.vander(xc, degree + 1, increasing=True), yc, rcond=None)[0]  # noqa: E731
    coef = np.stack([fit(xc, yc) for xc, yc in zip(x, y)])
    return coef, np.stack([x.min(1), x.max(1)], 1)


def apply_tone(warped: torch.Tensor, coef: np.ndarray, rng: np.ndarray, slope: np.ndarray) -> torch.Tensor:
    """The tone curve on warped (3, H, W): the polynomial inside its fitted range, continued with `slope` (3,) (the
    linear gain) beyond it, so a colour the fit never saw is not extrapolated by a cubic."""
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)[:, None, None]  # noqa: E731  (3,) -> (3, 1, 1)
    x = warped.double()
    xc = torch.minimum(torch.maximum(x, t(rng[:, 0])), t(rng[:, 1]))
    y = sum(t(coef[:, j]) * xc**j for j in range(coef.shape[1])) + t(slope) * (x - xc)
    return y.float().clamp(0, 1)


def _photometric(warped: torch.Tensor, draft: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The residual image of the gain/offset fit of warped to draft, weighted."""
    a, b = _gain_offset(warped, draft, w)
    return (a * warped + b - draft) * w.sqrt()


def _robust(res: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """Geman-McClure-like loss of a residual image: squared near 0, flat for outliers (another background)."""
    r2 = res.pow(2).sum(0)
    return (r2 / (r2 + c**2)).mean()


def _relative_residual(warped: torch.Tensor, draft: torch.Tensor, w: torch.Tensor, keep: float = 1.0) -> float:
    """RMS of the gain/offset fit's residual over the weighted pixels, relative to the draft's spread there
    (0 exact, 1 no better than a flat image); keep < 1 scores only that share of pixels with the smallest residual."""
    res = _photometric(warped, draft, w).pow(2).sum(0)
    spread = _photometric(torch.zeros_like(draft), draft, w).pow(2).sum(0)
    if keep < 1:
        sel = w[0] > 0
        cut = torch.quantile(res[sel], keep) if sel.any() else res.new_tensor(0.0)
        sel &= res <= cut
        res, spread = res[sel], spread[sel]
    return float(res.sum() / spread.sum().clamp_min(1e-12)) ** 0.5


def _blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x (3, H, W) under a Gaussian blur of sigma px (none at 0)."""
    return torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, sigma, sigma))) if sigma else x


@torch.inference_mode(False)
@torch.enable_grad()
def refine_fit(
    draft: torch.Tensor,
    reference: torch.Tensor,
    outside: torch.Tensor,
    init: np.ndarray,
    iters: int = 60,
    blurs: tuple[float, ...] = (2.0, 0.0),
    robust: bool = False,
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Direct refinement of a homography on the pixels `outside` (H, W) that the reference covers (coarse to fine),
    with a gain and offset per channel: (matrix, residual relative to the draft's own spread there, gain (3,),
    offset (3,)). robust: a loss flat for outliers (the object path: a ring that may cross into another background),
    and the residual scored on its best 80% of pixels."""
    hw, ref_hw = tuple(draft.shape[-2:]), tuple(reference.shape[-2:])
    s = max(hw)
    norm = torch.tensor([[1 / s, 0, 0], [0, 1 / s, 0], [0, 0, 1]], dtype=torch.float64)  # optimise in unit coords
    base = norm @ torch.as_tensor(init, dtype=torch.float64) @ torch.linalg.inv(norm)
    delta = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    w = outside.float()[None] * _inside(torch.as_tensor(init, dtype=torch.float64), hw, ref_hw)
    for sigma in blurs:
        d, r = _blurred(draft, sigma), _blurred(reference, sigma)
        opt = torch.optim.Adam([delta], lr=1e-3)
        for _ in range(iters):
            h_mat = torch.linalg.inv(norm) @ (base + torch.cat([delta, delta.new_zeros(1)]).reshape(3, 3)) @ norm
            warped = F.grid_sample(
                r[None].double(), _grid(h_mat, hw, ref_hw), mode="bilinear", padding_mode="border", align_corners=False
            )[0]
            res = _photometric(warped, d.double(), w)
            loss = _robust(res) if robust else res.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        h_mat = torch.linalg.inv(norm) @ (base + torch.cat([delta, delta.new_zeros(1)]).reshape(3, 3)) @ norm
        w = outside.float()[None] * _inside(h_mat, hw, ref_hw)
        a, b = _gain_offset(warp_reference(reference, h_mat.numpy(), hw).double(), draft.double(), w)
        sigma = blurs[-1]  # scored at the last stage's scale (the object path keeps a blur: the two views alias apart)
        warped = warp_reference(_blurred(reference, sigma), h_mat.numpy(), hw).double()
        rel = _relative_residual(warped, _blurred(draft, sigma).double(), w, 0.8 if robust else 1.0)
    return (h_mat / h_mat[2, 2]).numpy(), rel, a.flatten().numpy(), b.flatten().numpy()


@torch.inference_mode(False)
@torch.enable_grad()
def refine_flow(
    draft: torch.Tensor,
    reference: torch.Tensor,
    ring: torch.Tensor,
    matrix: np.ndarray,
    grid: int = 8,
    iters: int = 80,
    smooth: float = 0.005,
    blurs: tuple[float, ...] = (2.0, 0.0),
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """A non-rigid correction after the homography (a label bent around a cylinder): a smooth displacement (x, y) in
    reference px on a grid×grid lattice, bicubically upsampled, fitted photometrically on the ring (robust loss, a
    second-difference smoothness penalty that also carries it into the region): (flow (2, H, W), residual, gain,
    offset)."""
    hw, ref_hw = tuple(draft.shape[-2:]), tuple(reference.shape[-2:])
    h_mat = torch.as_tensor(matrix, dtype=torch.float64)
    ctrl = torch.zeros(1, 2, grid, grid, dtype=torch.float64, requires_grad=True)
    w = ring.float()[None].double() * _inside(h_mat, hw, ref_hw)
    up = lambda c: F.interpolate(c, size=hw, mode="bicubic", align_corners=True)[0]  # noqa: E731
    for sigma in blurs:
        d, r = _blurred(draft, sigma).double(), _blurred(reference, sigma).double()
        opt = torch.optim.Adam([ctrl], lr=0.1)
        for _ in range(iters):
            warped = F.grid_sample(
                r[None], _grid(h_mat, hw, ref_hw, up(ctrl)), mode="bilinear", padding_mode="border", align_corners=False
            )[0]
            bend = (ctrl[..., 2:, :] - 2 * ctrl[..., 1:-1, :] + ctrl[..., :-2, :]).pow(2).mean() + (
                ctrl[..., 2:] - 2 * ctrl[..., 1:-1] + ctrl[..., :-2]
            ).pow(2).mean()
            loss = _robust(_photometric(warped, d, w)) + smooth * bend
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        flow = up(ctrl)
        warped = warp_reference(reference, matrix, hw, flow.numpy()).double()
        rel = _relative_residual(warped, draft.double(), w, 0.8)
        a, b = _gain_offset(warped, draft.double(), w)
    return flow.numpy(), rel, a.flatten().numpy(), b.flatten().numpy()


def reprojection(matrix: np.ndarray, src: np.ndarray, dst: np.ndarray, flow: np.ndarray | None = None) -> float:
    """Median distance (reference px) between the matched reference points src (N, 2) and where the warp (the
    homography, and a flow (2, H, W)) samples the reference at their draft points dst: how far a refined fit moved
    from the matches it started from."""
    if not len(src):
        return 0.0
    p = np.c_[dst, np.ones(len(dst))] @ np.linalg.inv(np.asarray(matrix)).T
    p = p[:, :2] / p[:, 2:]
    if flow is not None:
        ix = np.clip(np.round(dst).astype(int), 0, [flow.shape[2] - 1, flow.shape[1] - 1])
        p = p + flow[:, ix[:, 1], ix[:, 0]].T
    return float(np.median(np.linalg.norm(p - src, axis=1)))


def coverage(matrix: np.ndarray, outside: np.ndarray, ref_hw: tuple[int, int]) -> float:
    """Share of the draft's pixels outside the region (H, W bool) whose preimage under the homography lies inside
    the reference: what the photometric residual was measured on."""
    inside = _inside(torch.as_tensor(matrix, dtype=torch.float64), outside.shape, ref_hw)[0].numpy() > 0
    return float((inside & outside).sum() / max(outside.sum(), 1))


def ring_of(mask: torch.Tensor, margin: int = 4, width: int = 8) -> np.ndarray:
    """(H, W) bool: the band from `margin` to margin + width px around the region, where the draft is right and
    close to it: where a registration of the object is verified."""
    region = mask[0].numpy() > 0.5
    return ndimage.binary_dilation(region, iterations=margin + width) & ~ndimage.binary_dilation(
        region, iterations=margin
    )


REGISTRATION_BUDGET = 768 * 768  # pixels per image SIFT and the fit see (larger images are registered downscaled)


def _scaled(draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, sd: float, sr: float) -> tuple:
    """The draft, its region and the reference downscaled by sd / sr (the region kept {0, 1})."""
    hw = lambda x, s: (max(16, round(x.shape[-2] * s)), max(16, round(x.shape[-1] * s)))  # noqa: E731
    return resize(draft, hw(draft, sd)), resize_mask(mask, hw(draft, sd)), resize(reference, hw(reference, sr))


def _full_size(reg: Registration, sd: float, sr: float, hw: tuple[int, int]) -> Registration:
    """A registration found on downscaled copies, in full-size pixels (homography conjugated, flow upsampled)."""
    m = np.diag([1 / sd, 1 / sd, 1.0]) @ reg.matrix @ np.diag([sr, sr, 1.0])
    flow = None
    if reg.flow is not None:
        flow = F.interpolate(torch.from_numpy(reg.flow)[None], size=hw, mode="bilinear", align_corners=False)[0]
        flow = (flow / sr).numpy()
    return replace(reg, matrix=m / m[2, 2], flow=flow, reason=(reg.reason + " (registered downscaled)").strip())


# when a registration holds, chosen on val (bench/registration_rule.py: the best mean region PSNR of "the registered
# paste where it holds, else the draft" with at most 5% of each set's val cases harmed). On mini val chose 4 inliers
# (3 let a similarity through on a single spurious match; 2 of 36 object cases pasted below the draft) and a scene
# residual of 0.4 (a non-planar reference view fits the background at 0.4-0.5 and misplaces the region: those now
# try the object path, whose ring fit follows the surface next to the region).
MIN_INLIERS = 4  # RANSAC inliers outside the region
MAX_RESIDUAL = 0.4  # the scene fit's photometric residual (relative to the draft's spread) at most


def register(
    draft: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    *,
    min_inliers: int = MIN_INLIERS,
    max_residual: float = MAX_RESIDUAL,
    min_coverage: float = 0.5,
    max_ring_residual: float = 0.5,
    min_ring_coverage: float = 0.9,
    max_reprojection: float = 3.0,
    margin: int = 4,
    ring: int = 8,
    nonrigid: bool = True,
    seed: int = 0,
    budget: int = REGISTRATION_BUDGET,
) -> Registration:
    """Estimate the reference -> draft warp from SIFT matches anywhere outside the (dilated) region.

    Two scopes, tried in order. **scene** (the reference shares the draft's background): the homography refined on
    every pixel outside the region; it holds when the warped reference covers min_coverage of them and the
    photometric residual (RMS relative to the draft's own spread: 0 exact, 1 no better than flat) is at most
    max_residual. **object** (a product shot: only the object's own unmasked parts match): the homography refined
    on the ring around the region (ring_of) with a robust loss - of the fits from RANSAC's and from the scene path's,
    refined or not, the one with the lowest ring residual among those within max_reprojection px of the RANSAC
    inliers - then (nonrigid) a smooth flow for a curved surface, kept when it lowers the ring residual by 5% and
    stays within max_reprojection px; it holds when the warped reference covers min_ring_coverage of the ring and
    the ring's residual (its best 80% of pixels) is at most max_ring_residual. Fewer than min_inliers
    RANSAC inliers (MIN_INLIERS) fail at once. ok=False carries the reason; the caller then
    falls back (inference: align -> align_box, paste_warp -> paste)."""
    sd, sr = (min(1.0, (budget / (x.shape[-2] * x.shape[-1])) ** 0.5) for x in (draft, reference))
    if sd < 1 or sr < 1:  # registration under a pixel budget: fit on downscaled copies, map the warp back
        small = register(*_scaled(draft, mask, reference, sd, sr), margin=margin, ring=ring, nonrigid=nonrigid,
                         seed=seed, min_inliers=min_inliers, budget=budget)  # fmt: skip
        return _full_size(small, sd, sr, tuple(draft.shape[-2:]))
    outside = ~ndimage.binary_dilation(mask[0].numpy() > 0.5, iterations=margin)
    model, inl, nm = feature_fit(to_numpy(draft), to_numpy(reference), outside, seed)
    if model is None or inl < min_inliers:
        return Registration(
            np.eye(3), False, inl, nm, float("nan"), f"{inl} RANSAC inliers outside the region (< {min_inliers})"
        )
    ref_hw = tuple(reference.shape[-2:])
    mat, rms, gain, offset = refine_fit(draft, reference, torch.from_numpy(outside), model.params)
    cov = coverage(mat, outside, ref_hw) if np.isfinite(mat).all() else 0.0
    if cov >= min_coverage and rms <= max_residual:
        return with_tone(Registration(mat, True, inl, nm, rms, gain=gain, offset=offset), draft, reference, outside)
    scene = (
        f"scene: the warped reference covers {cov:.0%} of the draft outside the region (< {min_coverage:.0%})"
        if cov < min_coverage
        else f"scene: photometric residual {rms:.3f} after the fit (> {max_residual})"
    )
    band = ring_of(mask, margin, ring)
    ring_t = torch.from_numpy(band)
    starts = [model.params] + ([mat] if np.isfinite(mat).all() else [])  # RANSAC's fit, and the scene path's
    fits = [refine_fit(draft, reference, ring_t, h, robust=True, iters=n) for h in starts for n in (60, 0)]
    agree = [f for f in fits if reprojection(f[0], *model.inlier_points) <= max_reprojection]  # a periodic text can
    mat, rms, gain, offset = min(agree or fits, key=lambda f: f[1] if np.isfinite(f[1]) else np.inf)  # lure it away
    if not agree:
        why = f"{scene}; object: every ring fit moved > {max_reprojection} px from the RANSAC inliers"
        return Registration(mat, False, inl, nm, rms, why, scope="object")
    if not np.isfinite(mat).all():
        return Registration(mat, False, inl, nm, rms, f"{scene}; object: the fit diverged", scope="object")
    cov = coverage(mat, band, ref_hw)
    if cov < min_ring_coverage:
        why = f"{scene}; object: the warped reference covers {cov:.0%} of the ring (< {min_ring_coverage:.0%})"
        return Registration(mat, False, inl, nm, rms, why, scope="object")
    flow = None
    if nonrigid:
        fl, rms_nr, gain_nr, offset_nr = refine_flow(draft, reference, torch.from_numpy(band), mat)
        small = float(np.abs(fl[:, band]).max()) <= max_reprojection  # a bend, not a jump to the next line of text
        if rms_nr < 0.95 * rms and small and reprojection(mat, *model.inlier_points, fl) <= max_reprojection:
            flow, rms, gain, offset = fl, rms_nr, gain_nr, offset_nr
    if rms > max_ring_residual:
        why = f"{scene}; object: ring residual {rms:.3f} after the fit (> {max_ring_residual})"
        return Registration(mat, False, inl, nm, rms, why, scope="object", flow=flow)
    reg = Registration(mat, True, inl, nm, rms, gain=gain, offset=offset, scope="object", flow=flow)
    return with_tone(reg, draft, reference, band)


def with_tone(reg: Registration, draft: torch.Tensor, reference: torch.Tensor, where: np.ndarray) -> Registration:
    """reg with its light change fitted as a tone curve (fit_tone) on the pixels `where` (H, W) that the warped
    reference covers: the scene outside the region, or the object's ring."""
    hw = tuple(draft.shape[-2:])
    inside = _inside(torch.as_tensor(reg.matrix, dtype=torch.float64), hw, tuple(reference.shape[-2:]))[0].numpy() > 0
    fit = fit_tone(warp_reference(reference, reg.matrix, hw, reg.flow), draft, where & inside)
    return reg if fit is None else replace(reg, tone=fit[0], tone_range=fit[1])


def registered_paste(
    draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, reg: Registration
) -> torch.Tensor:
    """The no-model baseline a registration allows: the warped reference, its light matched to the draft
    (the fitted tone curve), pasted into the region with a soft seam; outside the dilated region the draft."""
    return soft_paste(draft, mask, relit_reference(reference, reg, tuple(draft.shape[-2:])))


def soft_paste(draft: torch.Tensor, mask: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """aligned (3, H, W: already in the draft's frame and light) pasted into the region with the paste seam."""
    s = seam_mask(mask)
    return s * aligned + (1 - s) * draft


def match_light(aligned: torch.Tensor, draft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """aligned (3, H, W: in the draft's frame) with the per-channel gain/offset that maps it onto the draft outside
    the (dilated) region: what relit_reference does with a registration's fitted light."""
    a, b = _gain_offset(aligned.double(), draft.double(), 1 - seam_mask(mask).double())
    return (a * aligned + b).float().clamp(0, 1)


def relit_reference(reference: torch.Tensor, reg: Registration, hw: tuple[int, int]) -> torch.Tensor:
    """The reference warped into the draft's frame (3, H, W) with its light matched to the draft's (the
    registration's per-channel tone curve, else its gain/offset, fitted outside the region)."""
    warped = warp_reference(reference, reg.matrix, hw, reg.flow)
    if reg.tone is not None:
        return apply_tone(warped, reg.tone, reg.tone_range, reg.gain)
    gain = torch.as_tensor(reg.gain, dtype=torch.float32)[:, None, None]
    return (gain * warped + torch.as_tensor(reg.offset, dtype=torch.float32)[:, None, None]).clamp(0, 1)


class RegistrationCache:
    """register() memoised on the pixels (the methods of one evaluation register the same case). Explicit:
    `REGISTRATIONS(draft, mask, reference, seed)`, `REGISTRATIONS.clear()`; holds at most `size` entries."""

    def __init__(self, size: int = 512):
        self.size, self.entries = size, {}

    def __call__(self, draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> Registration:
        """The registration of this draft/mask/reference, computed once."""
        pixels = b"".join(t.contiguous().numpy().tobytes() for t in (draft, mask, reference))
        key = hashlib.sha1(pixels + bytes([seed % 256])).hexdigest()
        if key not in self.entries:
            if len(self.entries) >= self.size:
                self.entries.clear()
            self.entries[key] = register(draft, mask, reference, seed=seed)
        return self.entries[key]

    def clear(self) -> None:
        """Forget every registration (e.g. after changing align's rule in a benchmark)."""
        self.entries.clear()


REGISTRATIONS = RegistrationCache()
