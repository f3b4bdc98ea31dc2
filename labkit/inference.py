"""Inference behind `labkit.refine(image, mask, reference, method, ...)`: one entry for notebooks and researchers.

Methods (the model ones use the frozen editor, or an adapter from 04_train_freqmole / any folder):
    input  the draft itself, untouched (no model)
    paste  the reference's region resized into the mask's box, soft-blended (no model; needs reference_box,
           else M* locates it)
    full   Kontext-style: the whole image regenerated from [draft, references] (RefGC-SR2's setting)
    focus  Focus-and-Refine (RefineAnything): crop around the mask, upsample to the working area, refine,
           soft-paste back; pixels outside the box stay bit-identical
    align  Align→Focus: M* (Refine-by-Align) locates the region in the reference, the reference is cropped
           around it and upsampled, then Focus-and-Refine
Images: PIL images, (3, H, W) tensors in [0, 1] or (H, W, 3) arrays; masks likewise (H, W) / (1, H, W).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import focus as F_
from .util import REPO

METHODS = ("input", "paste", "full", "focus", "align")
ADAPTERS = REPO / "figures" / "04_train_freqmole" / "adapters"


# ------------------------------------------------------------------------------------------------
# inputs
def as_image_tensor(x, name: str = "image") -> torch.Tensor:
    """PIL / (3, H, W) or (1, 3, H, W) tensor / (H, W, 3) array -> (3, H, W) float tensor in [0, 1]."""
    from PIL import Image
    if isinstance(x, Image.Image):
        return torch.from_numpy(np.asarray(x.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[-1] == 3:
        x = torch.from_numpy(x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)).permute(2, 0, 1)
    if isinstance(x, torch.Tensor):
        x = x[0] if x.ndim == 4 and x.shape[0] == 1 else x
        if x.ndim == 3 and x.shape[0] == 3:
            return x.detach().float().cpu().clamp(0, 1)
        raise ValueError(f"{name} must be (3, H, W) in [0, 1]; got shape {tuple(x.shape)}")
    raise TypeError(f"{name} must be a PIL.Image, a (3, H, W) tensor in [0, 1] or an (H, W, 3) array; got {type(x).__name__}")


def as_mask_tensor(m, hw: tuple[int, int]) -> torch.Tensor:
    """PIL / tensor / array mask -> (1, H, W) in {0, 1}; checks its size against the image and that it is not empty."""
    from PIL import Image
    if isinstance(m, Image.Image):
        m = np.asarray(m.convert("L"), np.float32) / 255.0
    t = torch.as_tensor(np.asarray(m, np.float32) if not isinstance(m, torch.Tensor) else m).float().cpu()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (1, H, W); got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(hw):
        raise ValueError(f"mask size {tuple(t.shape)} does not match the image {tuple(hw)}: resize the mask to the image (nearest)")
    t = (t > 0.5).float()[None]
    if t.sum() == 0:
        raise ValueError("empty mask: mark at least one pixel of the region to refine (mask > 0.5)")
    return t


def as_references(reference) -> list[torch.Tensor]:
    """None / one image / a list of images -> list of (3, h, w) tensors."""
    if reference is None:
        return []
    if isinstance(reference, (list, tuple)):
        return [as_image_tensor(r, f"reference[{i}]") for i, r in enumerate(reference)]
    return [as_image_tensor(reference, "reference")]


def to_pil(x: torch.Tensor):
    """(3, H, W) in [0, 1] -> PIL RGB."""
    from PIL import Image
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# models
@dataclass
class Refiner:
    """A loaded backbone (+ optional adapter) and the instruction it was trained with."""

    bb: object
    prompt: str
    adapter: str | None = None
    provenance: dict = field(default_factory=dict)


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """An adapter folder (with adapter.json) by path, or by name under figures/04_train_freqmole/adapters."""
    for p in (Path(adapter), ADAPTERS / str(adapter)):
        if (p / "adapter.json").exists():
            return p
    have = sorted(p.name for p in ADAPTERS.glob("*") if (p / "adapter.json").exists()) if ADAPTERS.exists() else []
    raise FileNotFoundError(f"no adapter {str(adapter)!r} (looked for adapter.json in {adapter} and {ADAPTERS / str(adapter)}); "
                            f"available: {have or 'none'} - run `make figures NB=04_train_freqmole` to train them")


@functools.lru_cache(maxsize=8)
def load_refiner(preset: str = "mini", adapter: str | None = None, device: str = "cpu") -> Refiner:
    """The frozen editor (adapter=None) or the editor with an adapter folder/name loaded (cached)."""
    from . import freqmole as FM
    from .models import load
    bb = load(preset, device=device)
    if adapter is None:
        return Refiner(bb, "restore")
    folder = resolve_adapter(adapter)
    spec = FM.load(bb.transformer, folder)
    bb.eval().requires_grad_(False)
    import hashlib
    sha = hashlib.sha256((folder / "adapter.safetensors").read_bytes()).hexdigest()
    return Refiner(bb, spec.get("sft", {}).get("prompt", "refine"), str(folder),
                   dict(folder=str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder), sha256=sha,
                        kind=spec["kind"], rank=spec["rank"], sft=spec.get("sft"), training=spec.get("training")))


# ------------------------------------------------------------------------------------------------
# the pieces
@torch.no_grad()
def generate(r: Refiner, draft: torch.Tensor, references: Sequence[torch.Tensor], steps: int, seed: int,
             budget: int | None = None) -> torch.Tensor:
    """Euler-sample the target from contexts [draft (id 1), references (ids 2..) packed under a pixel budget]."""
    from .models import pack_references
    from .sampling import sample
    bb = r.bb
    h, w = draft.shape[-2:]
    if h % bb.multiple or w % bb.multiple:
        raise ValueError(f"image sides must be multiples of {bb.multiple} for the model path; got {h}x{w}: resize to "
                         f"{h // bb.multiple * bb.multiple}x{w // bb.multiple * bb.multiple} or use method='focus'")
    refs = pack_references(list(references), budget or h * w, bb.multiple) if references else []
    ctx = [bb.encode(draft[None].to(bb.device))] + [bb.encode(x[None].to(bb.device)) for x in refs]
    z = sample(bb, ctx, r.prompt, shape=(1, ctx[0].shape[1], h // bb.factor, w // bb.factor), steps=steps,
              generator=torch.Generator().manual_seed(seed))
    return bb.decode(z)[0].cpu()


@torch.no_grad()
def locate(r: Refiner, draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
           timesteps: Sequence[float] = (0.75, 0.5, 0.25), seed: int = 0, thr: float = 0.5) -> tuple[int, int, int, int]:
    """Refine-by-Align: M* = draft-in-mask queries -> reference keys, averaged over timesteps and every block
    (the average beat any single (t, l) on mini, 01_attention_correspondence); its largest component's box."""
    from . import attention as A
    bb = r.bb
    p = bb.multiple
    ref = F_.resize(reference, (reference.shape[-2] // p * p or p, reference.shape[-1] // p * p or p))
    z_d, z_r = bb.encode(draft[None]), bb.encode(ref[None])
    n_tok = z_d.shape[-2] * z_d.shape[-1] // 4
    n_ref = z_r.shape[-2] * z_r.shape[-1] // 4
    spec = A.CaptureSpec(queries={"draft": A.tokens_in_mask(mask, p, offset=n_tok)}, ref=slice(2 * n_tok, 2 * n_tok + n_ref))
    g = torch.Generator().manual_seed(seed)
    with A.capture(bb.transformer, spec, n_image=2 * n_tok + n_ref) as rec:
        for t in timesteps:  # the draft noised to t stands in for the unknown target (SDEdit-style)
            eps = torch.randn(z_d.shape, generator=g)
            bb((1 - t) * z_d + t * eps, float(t), [z_d, z_r], prompt=r.prompt)
    m = torch.stack([v[0] / v[0].sum() for v in rec.maps.values()]).mean(0)
    _, box = A.map_to_box(A.to_grid(m, (ref.shape[-2] // p, ref.shape[-1] // p)), thr, p)
    sy, sx = reference.shape[-2] / ref.shape[-2], reference.shape[-1] / ref.shape[-1]  # back to the reference's pixels
    return int(box[0] * sx), int(box[1] * sy), int(round(box[2] * sx)), int(round(box[3] * sy))


def naive_paste(draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, reference_box, soft: bool = True) -> torch.Tensor:
    """The reference's box resized into the mask's bounding box, blended by the (soft) mask: no model."""
    from .data import bbox_of
    box = bbox_of(mask)
    src = F_.crop(reference, reference_box)
    s = F_.soft_mask(F_.crop(mask, box)) * F_.crop(mask, box).clamp(0, 1) if soft else F_.crop(mask, box)
    return F_.paste_back(draft, src, box, s if soft else F_.crop(mask, box))


def focus_refine(r: Refiner, draft: torch.Tensor, mask: torch.Tensor, references: Sequence[torch.Tensor], steps: int, seed: int,
                 margin: float = 16, working_area: int | None = None) -> tuple[torch.Tensor, tuple]:
    """Focus-and-Refine: crop + upsample to the working area, refine the crop, soft-paste back into the box."""
    area = working_area or draft.shape[-2] * draft.shape[-1]
    c_img, c_mask, box = F_.focus_crop(draft, mask, area, r.bb.multiple, margin)
    out = generate(r, c_img, references, steps, seed, budget=area)
    soft = F_.soft_mask(F_.crop(mask, box), dilate=5, blur_radius=3.0)
    return F_.paste_back(draft, out, box, soft), box


# ------------------------------------------------------------------------------------------------
def refine_tensor(image, mask, reference=None, method: str = "focus", adapter: str | None = None, steps: int = 8,
                  seed: int = 0, preset: str = "mini", device: str = "cpu", reference_box=None, margin: float = 16,
                  working_area: int | None = None) -> tuple[torch.Tensor, dict]:
    """refine() on tensors: returns the (3, H, W) result and what was done (boxes, prompt, adapter)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    img = as_image_tensor(image)
    m = as_mask_tensor(mask, img.shape[-2:])
    refs = as_references(reference)
    info: dict = dict(method=method, adapter=adapter)
    if method == "input":
        return img.clone(), info
    if method in ("paste", "align") and not refs:
        raise ValueError(f"method {method!r} needs a reference image; pass reference=... or use 'focus'/'full' (reference-free)")
    r = load_refiner(preset, adapter, device) if method != "paste" or reference_box is None else None
    if method == "paste":
        box = reference_box if reference_box is not None else locate(load_refiner(preset, None, device), img, m, refs[0], seed=seed)
        info["reference_box"] = tuple(int(v) for v in box)
        return naive_paste(img, m, refs[0], box), info
    info["prompt"] = r.prompt
    if method == "full":
        return generate(r, img, refs, steps, seed), info
    if method == "align":
        from .attention import crop_reference
        rbox = reference_box if reference_box is not None else locate(r, img, m, refs[0], seed=seed)
        info["reference_box"] = tuple(int(v) for v in rbox)
        refs = [crop_reference(refs[0], rbox, out_size=None, multiple=r.bb.multiple)] + refs[1:]
    out, box = focus_refine(r, img, m, refs, steps, seed, margin, working_area)
    info["box"] = tuple(int(v) for v in box)
    return out, info


def refine(image, mask, reference=None, method: str = "focus", adapter: str | None = None, steps: int = 8, seed: int = 0,
           preset: str = "mini", **kw):
    """Refine the masked region of `image` (optionally from reference image(s)); PIL image of the input's size.

    method: input | paste | full | focus | align (module docstring); adapter: None (frozen editor), a name
    under figures/04_train_freqmole/adapters (lora, freqmole, freqmole+freq, freqmole+boundary) or a folder."""
    out, _ = refine_tensor(image, mask, reference, method, adapter, steps, seed, preset, **kw)
    return to_pil(out)


def describe_adapters() -> dict:
    """name -> adapter.json of every committed adapter (provenance for results.json)."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(ADAPTERS.glob("*/adapter.json"))}
