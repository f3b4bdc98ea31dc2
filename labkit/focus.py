"""Focus-and-Refine (RefineAnything): crop box around the mask, upsample to the working area,
soft mask, paste back. Pixels outside the box are untouched by construction (bit-identical).

Images are (3, H, W) or (B, 3, H, W) tensors in [0, 1]; masks (1, H, W) / (B, 1, H, W) in {0, 1}.
Boxes are (x0, y0, x1, y1) with x1/y1 exclusive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .frequency import lowpass
from .images import bbox_of, resize, resize_mask
from .losses import boundary_band
from .metrics import mse

Box = tuple[int, int, int, int]


def snap_size(h: int, w: int, area: int, multiple: int = 16) -> tuple[int, int]:
    """(h', w') with h'·w' ≈ area, aspect kept, sides snapped to `multiple` (at least one multiple)."""
    s = math.sqrt(area / (h * w))
    return max(multiple, round(h * s / multiple) * multiple), max(multiple, round(w * s / multiple) * multiple)


def focus_box(mask: torch.Tensor, margin: float = 64, working_area: int = 1024**2) -> Box:
    """bbox(mask) grown by margin/s on each side (s = sqrt(working_area / (W·H)), the paper's scaling), clipped.

    An empty mask raises (nothing to refine); an all-ones mask gives the whole image (Focus = no crop).
    """
    h, w = mask.shape[-2:]
    x0, y0, x1, y1 = bbox_of(mask)
    m = margin / math.sqrt(working_area / (w * h))
    x0, y0, x1, y1 = math.floor(x0 - m), math.floor(y0 - m), math.ceil(x1 + m), math.ceil(y1 + m)
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


def crop(img: torch.Tensor, box: Box) -> torch.Tensor:
    """The box's pixels (…, C, y1-y0, x1-x0)."""
    x0, y0, x1, y1 = box
    return img[..., y0:y1, x0:x1]


def focus_crop(
    img: torch.Tensor, mask: torch.Tensor, working_area: int, multiple: int = 16, margin: float = 64
) -> tuple[torch.Tensor, torch.Tensor, Box]:
    """Crop image and mask around the mask and upsample to ≈working_area (aspect kept, snapped sides); the
    crop's mask stays {0, 1} (images.resize_mask's 'threshold')."""
    box = focus_box(mask, margin, working_area)
    c_img, c_mask = crop(img, box), crop(mask, box)
    hw = snap_size(c_img.shape[-2], c_img.shape[-1], working_area, multiple)
    return resize(c_img, hw), resize_mask(c_mask, hw), box


def soft_mask(mask: torch.Tensor, dilate: int = 7, blur_radius: float = 5.0) -> torch.Tensor:
    """Dilate (max filter of size `dilate`) then Gaussian blur (σ = blur_radius / 2, as PIL's radius)."""
    x = mask.float()[None] if mask.ndim == 3 else mask.float()
    if dilate > 1:
        x = F.max_pool2d(F.pad(x, [dilate // 2, (dilate - 1) // 2] * 2, mode="replicate"), dilate, stride=1)
    if blur_radius > 0:
        x = lowpass(x, sigma=blur_radius / 2)
    x = x.clamp(0, 1)
    return x[0] if mask.ndim == 3 else x


# the paste seam every soft paste of labkit.refine uses: the region dilated by a 5 px max filter, blurred (σ 1.5 px)
SEAM_DILATE, SEAM_BLUR = 5, 3.0


def seam_mask(mask: torch.Tensor) -> torch.Tensor:
    """The paste seam's blend weight (1, H, W) for a region: soft_mask at SEAM_DILATE / SEAM_BLUR."""
    return soft_mask(mask, dilate=SEAM_DILATE, blur_radius=SEAM_BLUR)


def naive_paste(draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, reference_box: Box) -> torch.Tensor:
    """The reference's box resized into the mask's bounding box, blended by the soft mask: no model."""
    box = bbox_of(mask)
    s = soft_mask(crop(mask, box)) * crop(mask, box).clamp(0, 1)
    return paste_back(draft, crop(reference, reference_box), box, s)


def paste_back(
    original: torch.Tensor,
    refined_crop: torch.Tensor,
    box: Box,
    soft: torch.Tensor | None = None,
    residual_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resize the refined crop back into `box` and blend with the soft mask (box coords); outside the box
    the result is bit-identical to `original`. soft=None pastes the whole box (hard).
    residual_of: the box's image (C, y1-y0, x1-x0) the refined crop was upsampled from: only the change
    (refined − its upsampling) is resized back and added to it, so what the refiner left as it was returns without
    the up-and-down resampling's loss of detail (identity when the refiner changes nothing)."""
    x0, y0, x1, y1 = box
    hw = (y1 - y0, x1 - x0)
    if residual_of is None:
        back = resize(refined_crop, hw).to(original.dtype)
    else:
        up = resize(residual_of, refined_crop.shape[-2:])  # as focus_crop upsampled it
        back = (residual_of + resize(refined_crop - up, hw, clamp=False)).clamp(0, 1).to(original.dtype)
    orig = crop(original, box)
    if soft is not None:
        s = soft if soft.shape[-2:] == hw else resize(soft.float(), hw, mode="bilinear")
        back = s.to(orig) * back + (1 - s.to(orig)) * orig
    out = original.clone()
    out[..., y0:y1, x0:x1] = back
    return out


def seam_error(result: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Mean squared error in a band of ±radius pixels around the mask edge (B,)."""
    m = mask[None] if mask.ndim == 3 else mask
    return mse(result, target, boundary_band(m.float(), radius))


# ------------------------------------------------------------------------------------------------
# region conditioning (RefineAnything's spatial conditioning), with no new weight shapes: the region as an
# extra context image, or drawn onto the draft
REGION_OUTLINE = (1.0, 0.0, 1.0)  # magenta: rare in photos, text and logos
REGION_ENCODINGS = ("none", "context", "draw")


def region_image(mask: torch.Tensor) -> torch.Tensor:
    """The mask (1, H, W) rendered as an RGB image (3, H, W): white region on black."""
    return mask.float().clamp(0, 1).expand(3, -1, -1).clone()


def draw_region(draft: torch.Tensor, mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """The draft (3, H, W) with the region's outline (a band of `width` px just outside it) drawn in magenta."""
    m = mask.float()[None]
    ring = (F.max_pool2d(m, 2 * width + 1, 1, width) - m).clamp(0, 1)[0]  # (1, H, W)
    col = torch.tensor(REGION_OUTLINE, dtype=draft.dtype)[:, None, None]
    return draft * (1 - ring) + col * ring


def region_contexts(draft: torch.Tensor, mask: torch.Tensor, references: list, encoding: str = "none") -> list:
    """The editor's contexts for a region encoding: none [draft, refs...], context [draft, region image,
    refs...] or draw [draft with the region outlined, refs...]."""
    if encoding == "none":
        return [draft, *references]
    if encoding == "context":
        return [draft, region_image(mask), *references]
    if encoding == "draw":
        return [draw_region(draft, mask), *references]
    raise ValueError(f"unknown region encoding {encoding!r}; choose from {REGION_ENCODINGS}")
