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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import focus as F_
from .util import REPO

METHODS = ("input", "paste", "full", "focus", "align")
ADAPTERS = REPO / "figures" / "04_train_freqmole" / "adapters"


# ------------------------------------------------------------------------------------------------
# inputs
def _array(x, name: str) -> np.ndarray | torch.Tensor:
    from PIL import Image
    if isinstance(x, Image.Image):
        return np.asarray(x)
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x
    raise TypeError(f"{name} must be a PIL.Image, a (3, H, W) tensor or an (H, W, 3) array; got {type(x).__name__}")


def as_image_tensor(x, name: str = "image") -> torch.Tensor:
    """PIL / (3, H, W) or (1, 3, H, W) tensor / (H, W, 3) array -> (3, H, W) float tensor in [0, 1].

    Integer data (uint8 PIL images and arrays, integer tensors) is read as 0..255; float data must already be
    in [0, 1] and finite - anything else is refused with what was given and how to fix it."""
    from PIL import Image
    if isinstance(x, Image.Image):
        x = x.convert("RGB")
    a = _array(x, name)
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()
    if isinstance(a, np.ndarray) and t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)  # (H, W, 3) arrays
    t = t[0] if t.ndim == 4 and t.shape[0] == 1 else t
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"{name} must be RGB: (3, H, W) tensor or (H, W, 3) array / PIL image; got shape {tuple(t.shape)} "
                         "(convert grey or RGBA images with PIL's .convert('RGB'))")
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} has dtype {t.dtype}: pass uint8 (0..255) or float (0..1) pixels")
    if not t.is_floating_point():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{name} is integer with values in [{lo}, {hi}]; expected 0..255 (uint8)")
        return t.float() / 255.0
    t = t.float()
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise ValueError(f"{name} holds {bad} NaN/inf values: pass finite pixels (e.g. torch.nan_to_num(x).clamp(0, 1))")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        hint = "divide by 255" if hi <= 255 and lo >= 0 else "rescale it to [0, 1] (e.g. (x + 1) / 2 for [-1, 1] data)"
        raise ValueError(f"{name} is float with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]: {hint}")
    return t.clamp(0, 1)


def as_mask_tensor(m, hw: tuple[int, int]) -> torch.Tensor:
    """PIL / tensor / array mask -> (1, H, W) in {0, 1}: bool, 0/1 or 0/255 integers, or float in [0, 1]
    (> 0.5 is inside); checks its size against the image and that it is not empty."""
    from PIL import Image
    if isinstance(m, Image.Image):
        m = m.convert("L")
    a = _array(m, "mask")
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (1, H, W); got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(hw):
        raise ValueError(f"mask size {tuple(t.shape)} does not match the image {tuple(hw)}: resize the mask to the image (nearest)")
    if t.dtype == torch.bool:
        inside = t
    elif not t.is_floating_point():  # 0/1 or 0/255 integer masks (a PIL 'L' mask may hold either)
        inside = t > (0 if int(t.max()) <= 1 else 127)
    else:
        if not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1 + 1e-6:
            raise ValueError(f"float mask values must be finite and in [0, 1]; got [{float(t.min()):.3g}, {float(t.max()):.3g}] "
                             "(pass a uint8 0/255 mask, or divide by 255)")
        inside = t > 0.5
    if not inside.any():
        raise ValueError("empty mask: mark at least one pixel of the region to refine (mask > 0.5, or > 127 for 0..255 masks)")
    return inside.float()[None]


def check_steps(steps) -> int:
    """Sampler steps: an integer >= 1 (numpy integers accepted)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the number of sampler steps); got {steps!r}")
    return int(steps)


def resolve_seed(seed) -> int:
    """seed=None draws a fresh random seed (reported back in the output's info); else an integer."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % 2**31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, or None for a fresh random one; got {seed!r}")
    return int(seed)


def check_size(hw: tuple[int, int], multiple: int, name: str = "image") -> None:
    """Model methods need at least one packing unit per side (VAE x8 and 2x2 packing: `multiple` pixels)."""
    h, w = hw
    if h < multiple or w < multiple:
        raise ValueError(f"{name} is {h}x{w} pixels; the model methods need at least {multiple}x{multiple} (one VAE x8 "
                         f"latent 2x2 patch): upsample it first, e.g. PIL .resize(({max(w, multiple)}, {max(h, multiple)}))")


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
    """An adapter folder by path (the folder, or a training run's --out holding adapter/), or by name under
    figures/04_train_freqmole/adapters."""
    from .freqmole import adapter_folder
    for p in (Path(adapter), ADAPTERS / str(adapter)):
        try:
            return adapter_folder(p)
        except FileNotFoundError:
            pass
    have = sorted(p.name for p in ADAPTERS.glob("*") if (p / "adapter.json").exists()) if ADAPTERS.exists() else []
    raise FileNotFoundError(f"no adapter {str(adapter)!r} (looked for adapter.json in {adapter}, {Path(adapter) / 'adapter'} and "
                            f"{ADAPTERS / str(adapter)}); available: {have or 'none'} - run `make figures NB=04_train_freqmole` to train them")


@functools.lru_cache(maxsize=8)
def load_refiner(preset: str = "mini", adapter: str | None = None, device: str = "cpu") -> Refiner:
    """The frozen editor (adapter=None) or the editor with an adapter folder/name loaded (cached)."""
    from . import freqmole as FM
    from .models import load
    bb = load(preset, device=device)
    if adapter is None:
        return Refiner(bb, "restore")
    folder = resolve_adapter(adapter)
    spec = FM.load(bb.transformer, folder, identity=bb.identity())
    bb.eval().requires_grad_(False)
    import hashlib
    sha = hashlib.sha256((folder / "adapter.safetensors").read_bytes()).hexdigest()
    return Refiner(bb, spec.get("sft", {}).get("prompt", "refine"), str(folder),
                   dict(folder=str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder), sha256=sha,
                        kind=spec["kind"], rank=spec["rank"], sft=spec.get("sft"), training=spec.get("training")))


# ------------------------------------------------------------------------------------------------
# the pieces
@torch.no_grad()
def edit(r: Refiner, draft: torch.Tensor, references: Sequence[torch.Tensor], steps: int, seed: int, budget: int | None = None,
         prompt: str | None = None, guidance: float | None = None, latents: torch.Tensor | None = None,
         size: tuple[int, int] | None = None, negative_prompt: str | None = None, true_cfg: float = 1.0) -> torch.Tensor:
    """Kontext-style sampling of a target (size: draft's by default) from contexts [draft (id 1), references
    (ids 2..) packed under a pixel budget (SELF)]: (3, H, W) in [0, 1]. latents: the initial noise, packed
    (1, seq, 64) as the pipeline takes it or (1, 16, h, w); else drawn from `seed` exactly as the pipeline draws it."""
    from .models import pack_references
    from .sampling import sample
    bb = r.bb
    h, w = size or draft.shape[-2:]
    for name, (a, b) in (("image", draft.shape[-2:]), ("target", (h, w))):
        if a % bb.multiple or b % bb.multiple:
            raise ValueError(f"{name} sides must be multiples of {bb.multiple} for the model path; got {a}x{b}: resize to "
                             f"{a // bb.multiple * bb.multiple}x{b // bb.multiple * bb.multiple} or use method='focus'")
    refs = pack_references(list(references), budget or h * w, bb.multiple) if references else []
    ctx = [bb.encode(draft[None].to(bb.device))] + [bb.encode(x[None].to(bb.device)) for x in refs]
    shape = (1, ctx[0].shape[1], h // bb.factor, w // bb.factor)
    if latents is not None and latents.ndim == 3:  # packed, as FluxKontextPipeline(latents=...) takes them
        latents = bb.unpack(latents, shape[-2], shape[-1])
    neg = bb.encode_prompt(negative_prompt, batch=1) if negative_prompt is not None and true_cfg > 1 else None
    z = sample(bb, ctx, prompt or r.prompt, shape=shape, steps=steps, generator=torch.Generator().manual_seed(seed), latents=latents,
               guidance=guidance, negative_embeds=neg, true_cfg=true_cfg)
    return bb.decode(z)[0].float().cpu()


def kontext_size(h: int, w: int, preset) -> tuple[int, int]:
    """The context/target size a preset works at: FLUX.1-Kontext's preferred resolution closest in aspect
    (the pipeline's auto-resize, max_area = resolution²), else the image's own sides floored to the multiple."""
    if preset.kontext_resolutions:
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
        _, pw, ph = min((abs(w / h - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
        return ph // preset.multiple * preset.multiple, pw // preset.multiple * preset.multiple
    return max(preset.multiple, h // preset.multiple * preset.multiple), max(preset.multiple, w // preset.multiple * preset.multiple)


def generate(image, prompt: str, references=None, *, preset: str = "mini", steps: int | None = None, guidance: float | None = None,
             seed: int | None = 0, latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
             negative_prompt: str | None = None, true_cfg: float = 1.0, adapter: str | None = None, device: str = "cpu",
             auto_resize: bool | None = None):
    """Kontext-style whole-image editing: the image (and optional references) + a prompt -> a PIL image.

    preset: a preset name or a diffusers FluxKontextPipeline folder; steps/guidance default to the preset's
    (flux-kontext: 28, 2.5); the image is resized as the pipeline's auto-resize does for flux-kontext (the
    preferred resolution closest in aspect), else floored to the packing multiple; height/width (the output)
    default to that size (auto_resize=False keeps the image's own size, the pipeline's _auto_resize=False).
    Given a pipeline folder, the same arguments and initial `latents` (or seed) give the pipeline's own image.
    negative_prompt + true_cfg > 1: true classifier-free guidance."""
    r = load_refiner(str(preset), adapter, device)
    cfg = r.bb.preset
    steps, seed = check_steps(steps if steps is not None else cfg.steps), resolve_seed(seed)
    img = as_image_tensor(image)
    check_size(img.shape[-2:], cfg.multiple)
    auto = cfg.kontext_resolutions if auto_resize is None else auto_resize
    hw = kontext_size(*img.shape[-2:], replace(cfg, kontext_resolutions=auto))
    if tuple(hw) != tuple(img.shape[-2:]):  # resized as the pipeline's image processor does (PIL, Lanczos)
        from PIL import Image
        img = as_image_tensor(to_pil(img).resize((hw[1], hw[0]), Image.LANCZOS))
    size = (height or hw[0], width or hw[1])
    out = edit(r, img, as_references(references), steps, seed, prompt=prompt, latents=latents, size=size,
               guidance=guidance if guidance is not None else cfg.guidance, negative_prompt=negative_prompt, true_cfg=true_cfg)
    pil = to_pil(out)
    pil.info.update(labkit_seed=seed, labkit_steps=steps)
    return pil


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
                 margin: float = 16, working_area: int | None = None, prompt: str | None = None) -> tuple[torch.Tensor, tuple]:
    """Focus-and-Refine: crop + upsample to the working area, refine the crop, soft-paste back into the box."""
    area = working_area or r.bb.preset.resolution ** 2  # the preset's working area (mini 128², flux-kontext 1024²)
    c_img, c_mask, box = F_.focus_crop(draft, mask, area, r.bb.multiple, margin)
    out = edit(r, c_img, references, steps, seed, budget=area, prompt=prompt)
    soft = F_.soft_mask(F_.crop(mask, box), dilate=5, blur_radius=3.0)
    return F_.paste_back(draft, out, box, soft), box


# ------------------------------------------------------------------------------------------------
def refine_tensor(image, mask, reference=None, method: str = "focus", adapter: str | None = None, steps: int | None = None,
                  seed: int | None = 0, preset: str = "mini", device: str = "cpu", reference_box=None, margin: float = 16,
                  working_area: int | None = None, prompt: str | None = None) -> tuple[torch.Tensor, dict]:
    """refine() on tensors: returns the (3, H, W) result and what was done (boxes, prompt, adapter, seed)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    from .presets import get
    steps, seed = check_steps(steps if steps is not None else get(preset).steps), resolve_seed(seed)
    img = as_image_tensor(image)
    m = as_mask_tensor(mask, img.shape[-2:])
    refs = as_references(reference)
    info: dict = dict(method=method, adapter=adapter, seed=seed, steps=steps)
    if method == "input":
        return img.clone(), info
    check_size(img.shape[-2:], get(preset).multiple)
    if method in ("paste", "align") and not refs:
        raise ValueError(f"method {method!r} needs a reference image; pass reference=... or use 'focus'/'full' (reference-free)")
    r = load_refiner(preset, adapter, device) if method != "paste" or reference_box is None else None
    if method == "paste":
        box = reference_box if reference_box is not None else locate(load_refiner(preset, None, device), img, m, refs[0], seed=seed)
        info["reference_box"] = tuple(int(v) for v in box)
        return naive_paste(img, m, refs[0], box), info
    info["prompt"] = prompt or r.prompt
    if method == "full":
        return edit(r, img, refs, steps, seed, prompt=prompt), info
    if method == "align":
        from .attention import crop_reference
        rbox = reference_box if reference_box is not None else locate(r, img, m, refs[0], seed=seed)
        info["reference_box"] = tuple(int(v) for v in rbox)
        refs = [crop_reference(refs[0], rbox, out_size=None, multiple=r.bb.multiple)] + refs[1:]
    out, box = focus_refine(r, img, m, refs, steps, seed, margin, working_area, prompt)
    info["box"] = tuple(int(v) for v in box)
    return out, info


def refine(image, mask, reference=None, method: str = "focus", adapter: str | None = None, steps: int | None = None,
           seed: int | None = 0, preset: str = "mini", prompt: str | None = None, **kw):
    """Refine the masked region of `image` (optionally from reference image(s)); PIL image of the input's size
    (its .info['labkit_seed'] holds the seed used: seed=None draws a fresh one).

    method: input | paste | full | focus | align (module docstring); adapter: None (frozen editor), a name
    under figures/04_train_freqmole/adapters (lora, freqmole, freqmole+freq, freqmole+boundary) or a folder."""
    out, info = refine_tensor(image, mask, reference, method, adapter, steps, seed, preset, prompt=prompt, **kw)
    pil = to_pil(out)
    pil.info.update(labkit_seed=info["seed"], labkit_method=method)  # seed=None: the seed that was drawn
    return pil


def describe_adapters() -> dict:
    """name -> adapter.json of every committed adapter (provenance for results.json)."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(ADAPTERS.glob("*/adapter.json"))}
