"""Images as users hand them in and as labkit passes them on: THE input check (`as_image_tensor`, `as_mask_tensor`,
`as_references`, `read_image`), resizing (images and masks), conversions (tensor / numpy / PIL) and boxes.

Tensors are (3, H, W) float in [0, 1]; masks (1, H, W) in {0, 1}; numpy images (H, W, 3); boxes (x0, y0, x1, y1)
with x1/y1 exclusive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


def resize(img: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic", clamp: bool = True) -> torch.Tensor:
    """THE resize: (..., C, H, W) tensor to size (square int or (h, w)), anti-aliased when shrinking,
    clamped to [0, 1] (clamp=False for signed fields such as differences); mode bicubic | bilinear | nearest | area."""
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = img.reshape(-1, *img.shape[-3:]).float()
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    kw = dict(align_corners=False, antialias=shrink) if mode in ("bicubic", "bilinear") else {}
    out = F.interpolate(x, size=hw, mode=mode, **kw)
    return (out.clamp(0, 1) if clamp else out).reshape(*img.shape[:-2], *hw)


MASK_RULES = ("threshold", "coverage", "touched")


def resize_mask(mask: torch.Tensor, hw: tuple[int, int], rule: str = "threshold") -> torch.Tensor:
    """THE mask resize, (..., 1, H, W) to hw by one of three rules: 'threshold' ({0, 1}: bilinear then > 0.5; a pixel
    mask at a new image size), 'coverage' (the fraction of each new cell the mask covers; loss weights on the
    latent grid), 'touched' ({0, 1}: 1 where the mask touches the cell; the latent cells a blend must generate)."""
    hw = (int(hw[0]), int(hw[1]))
    if rule == "threshold":
        return (resize(mask.float(), hw, "bilinear") > 0.5).float()
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; choose from {MASK_RULES}")
    if tuple(mask.shape[-2:]) == hw:
        return mask.float()
    x = mask.float().reshape(-1, *mask.shape[-3:])
    out = F.adaptive_avg_pool2d(x, hw) if rule == "coverage" else F.adaptive_max_pool2d(x, hw)
    return out.reshape(*mask.shape[:-2], *hw)


def resize_np(img: np.ndarray, size: int | tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """resize() for an (H, W, C) numpy image (this module's pixel format)."""
    return to_numpy(resize(to_tensor(img), size, mode))


def bicubic_draft(images: torch.Tensor, factor: int) -> torch.Tensor:
    """THE low-res draft: bicubic down by `factor` (anti-aliased) and back up to the same size (the
    no-model baseline at equal scale, the upscale task's context, Triplet.draft's recipe)."""
    h, w = images.shape[-2:]
    return resize(resize(images, (h // factor, w // factor)), (h, w))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(..., H, W, C) numpy -> (..., C, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, -3))).float()


def to_numpy(img: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) tensor -> (..., H, W, C) float32 numpy."""
    return np.moveaxis(img.detach().float().cpu().numpy(), -3, -1)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL RGB (rounded to uint8)."""
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# THE input check: images and masks as users hand them in (PIL, tensors, arrays)
def _array(x, name: str, what: str = "a (3, H, W) tensor or an (H, W, 3) array") -> np.ndarray | torch.Tensor:
    if isinstance(x, Image.Image):
        return np.asarray(x)
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x
    raise TypeError(
        f"{name} must be a PIL.Image, {what}; got {type(x).__name__}"
        + (" (wrap a list of lists in np.array(...))" if isinstance(x, (list, tuple)) else "")
    )


WIDE_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit and float single-channel images


def _pil_pixels(x: Image.Image) -> np.ndarray:
    """A PIL image's pixels by their own range: 16-bit (I;16, and I as 16-bit PNGs open) / 65535, 8-bit as is.

    PIL's own .convert('RGB') clips 16-bit values at 255 (a 16-bit PNG turns white), so wide modes are read here."""
    if x.mode in WIDE_PIL_MODES:
        a = np.asarray(x)
        if x.mode != "F":
            hi = int(a.max()) if a.size else 0
            if hi > 65535 or int(a.min()) < 0:
                raise ValueError(
                    f"a {x.mode} image with values in [{int(a.min())}, {hi}]: expected 16-bit 0..65535; "
                    "save it as 8- or 16-bit PNG"
                )
            a = a.astype(np.float32) / 65535.0
        return np.repeat(a.astype(np.float32)[..., None], 3, axis=2)
    return np.asarray(x.convert("RGB"))


def as_image_tensor(x, name: str = "image", min_side: int = 1) -> torch.Tensor:
    """PIL / (3, H, W) or (1, 3, H, W) tensor / (H, W, 3) array -> (3, H, W) float tensor in [0, 1].

    uint8 data is read as 0..255 and uint16 data (16-bit PNGs, PIL mode I;16) as 0..65535; other integer data
    must hold 0..255; float data must already be in [0, 1] and finite; each side at least `min_side` pixels (the
    model methods need one packing unit: VAE x8 and 2x2 packing) - anything else is refused with what was given
    and how to fix it."""
    if isinstance(x, Image.Image):
        x = _pil_pixels(x)
    a = _array(x, name)
    given = tuple(a.shape)
    wide = (isinstance(a, np.ndarray) and a.dtype == np.uint16) or (torch.is_tensor(a) and a.dtype == torch.uint16)
    n = a.numel() if torch.is_tensor(a) else a.size
    top = (int(a.to(torch.int32).max()) if torch.is_tensor(a) else int(a.max())) if wide and n else 0
    if 0 < top <= 255:
        raise ValueError(
            f"{name} is uint16 with values up to {top}: 8-bit pixels in a 16-bit array (read as 0..65535 "
            "they would be nearly black); cast it to uint8 (x.astype(np.uint8)) or scale it to 0..65535"
        )
    if isinstance(a, np.ndarray) and a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()
    if t.dtype == torch.uint16:
        t = t.to(torch.float32) / 65535.0
    if isinstance(a, np.ndarray) and t.ndim == 4 and t.shape[0] == 1 and t.shape[-1] == 3:
        t = t[0]  # a (1, H, W, 3) batch of one array
    if isinstance(a, np.ndarray) and t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)  # (H, W, 3) arrays
    t = t[0] if t.ndim == 4 and t.shape[0] == 1 else t
    if t.ndim != 3 or t.shape[0] != 3:
        hint = "convert grey or RGBA images with PIL's .convert('RGB')"
        if torch.is_tensor(a) and len(given) in (3, 4) and given[-1] == 3:
            hint = "a tensor is channels-first: pass x.permute(2, 0, 1) (or x[0].permute(2, 0, 1) for a batch of one)"
        raise ValueError(
            f"{name} must be RGB: a (3, H, W) or (1, 3, H, W) tensor, an (H, W, 3) array or a PIL image; got a "
            f"{type(a).__name__} of shape {given} ({hint})"
        )
    h, w = t.shape[-2:]
    if h < min_side or w < min_side:
        raise ValueError(
            f"{name} is {h}x{w} pixels; the model methods need at least {min_side}x{min_side} (one VAE x8 latent "
            f"2x2 patch): upsample it first, e.g. PIL .resize(({max(w, min_side)}, {max(h, min_side)}))"
        )
    if t.dtype == torch.bool or not (
        t.is_floating_point() or t.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)
    ):
        raise TypeError(f"{name} has dtype {t.dtype}: pass uint8 (0..255), uint16 (0..65535) or float (0..1) pixels")
    if not t.is_floating_point():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{name} is {t.dtype} with values in [{lo}, {hi}]; expected 0..255 (uint8), or pass uint16 "
                "data as uint16 (read as 0..65535)"
            )
        return t.float() / 255.0
    t = t.float()
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise ValueError(
            f"{name} holds {bad} NaN/inf values: pass finite pixels (e.g. torch.nan_to_num(x).clamp(0, 1))"
        )
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        hint = "divide by 255" if hi <= 255 and lo >= 0 else "rescale it to [0, 1] (e.g. (x + 1) / 2 for [-1, 1] data)"
        raise ValueError(f"{name} is float with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]: {hint}")
    return t.clamp(0, 1)


def _mask_plane(m) -> tuple[np.ndarray | torch.Tensor, str]:
    """The one plane a mask is read from, and how: the alpha channel when there is one that varies, else the
    brightest channel (so any non-black pixel - red, white, grey - counts, whatever its colour)."""
    if isinstance(m, Image.Image):
        if m.mode in WIDE_PIL_MODES:
            return np.asarray(m).astype(np.float32) / (1.0 if m.mode == "F" else 65535.0), f"PIL {m.mode} image"
        if m.mode == "P":
            m = m.convert("RGBA")
        bands = m.getbands()
        if "A" in bands:
            alpha = np.asarray(m.getchannel("A"))
            if alpha.min() != alpha.max():
                return alpha, f"the alpha channel of a PIL {m.mode} image"
        rgb = np.asarray(m.convert("RGB"))
        return rgb.max(axis=2), f"the brightest channel of a PIL {m.mode} image"
    a = _array(m, "mask", "an (H, W) or (1, H, W) tensor/array")
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3, 4):  # (H, W, 3|4) arrays
        if a.shape[-1] == 4 and a[..., 3].min() != a[..., 3].max():
            return a[..., 3], "the alpha channel of an (H, W, 4) array"
        return a[..., :3].max(-1) if isinstance(a, np.ndarray) else a[..., :3].amax(
            -1
        ), "the brightest channel of an (H, W, 3) array"
    return a, f"a {type(a).__name__} of shape {tuple(a.shape)}"


def as_mask_tensor(m, hw: tuple[int, int]) -> torch.Tensor:
    """PIL / tensor / array mask -> (1, H, W) in {0, 1}: any non-black pixel (0/1 or 0..255 integers: > 0 or
    > 31 on the brightest channel; float: > 0.5), or the alpha channel when it varies; checks the size against
    the image and that the mask is not empty (the error says what was read)."""
    a, how = _mask_plane(m)
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (1, H, W) (or an RGB/RGBA image); got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(hw):
        raise ValueError(
            f"mask size {tuple(t.shape)} does not match the image {tuple(hw)}: resize the mask to the image (nearest)"
        )
    if t.dtype == torch.bool:
        inside, rule = t, "True"
    elif not t.is_floating_point():  # 0/1 or 0..255 integer masks (a PIL 'L' mask may hold either)
        cut = 0 if int(t.max()) <= 1 else 31
        inside, rule = t > cut, f"> {cut}"
    else:
        if not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1 + 1e-6:
            raise ValueError(
                f"float mask values must be finite and in [0, 1]; got [{float(t.min()):.3g}, {float(t.max()):.3g}] "
                "(pass a uint8 0/255 mask, or divide by 255)"
            )
        inside, rule = t > 0.5, "> 0.5"
    if not inside.any():
        raise ValueError(
            f"empty mask: read {how}, values in [{float(t.min()):.3g}, {float(t.max()):.3g}], none {rule}; "
            "mark the region to refine with any non-black pixel (or an alpha channel)"
        )
    return inside.float()[None]


def read_image(path: str | Path, what: str = "image") -> Image.Image:
    """An image file, fully decoded; a missing, truncated or non-image file is a ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {str(p)!r} not found" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        img = Image.open(p)
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError)
        raise ValueError(f"cannot read {what} {str(p)!r} ({type(e).__name__}: {e}): save it as PNG/JPEG") from None
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(
            f"{what} {str(p)!r} has {img.n_frames} frames (an animation): save the one frame to use as PNG"
        )
    return ImageOps.exif_transpose(img)  # a camera's EXIF orientation applied: the pixels as the photo is seen


def as_references(reference, min_side: int = 1) -> list[torch.Tensor]:
    """None / one image / a list of images -> list of (3, h, w) tensors (each checked as as_image_tensor does)."""
    if reference is None:
        return []
    if isinstance(reference, (list, tuple)):
        return [as_image_tensor(r, f"reference[{i}]", min_side) for i, r in enumerate(reference)]
    return [as_image_tensor(reference, "reference", min_side)]


def bbox_of(mask: np.ndarray | torch.Tensor) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the nonzero pixels (x1, y1 exclusive); raises on an empty mask."""
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    while m.ndim > 2 and m.shape[0] == 1:  # (1, H, W) -> (H, W); a 1-pixel-high mask stays 2-D
        m = m[0]
    m = m > 0.5
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W) or (1, H, W), got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        raise ValueError("empty mask: mark at least one pixel of the region to refine (mask > 0.5)")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
