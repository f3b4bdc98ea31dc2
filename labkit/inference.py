"""Inference behind `labkit.refine(image, mask, reference, method, ...)`: one entry for notebooks and researchers.

Methods (the model ones use the frozen editor, or an adapter from 04_train_freqmole / any folder):
    input  the draft itself, untouched (no model)
    paste  the reference's region resized into the mask's box, soft-blended (no model; needs reference_box,
           else M* locates it)
    paste_warp  the registered paste: the reference warped into the draft's frame (labkit.align), its light
           matched, pasted into the region with a soft seam (no model; a failed registration falls back to paste)
    full   Kontext-style: the whole image regenerated from [draft, references] (RefGC-SR2's setting)
    focus  Focus-and-Refine (RefineAnything): crop around the mask, upsample to the working area, refine,
           soft-paste back; pixels outside the box stay bit-identical
    align  Align as a warp, then Focus: the reference is registered into the draft's frame from correspondences
           outside the region (labkit.align: SIFT + RANSAC, refined on the pixels), warped, and cropped by the
           same focus box as the draft, so the editor's contexts line up; a poor fit falls back to the M* box
           (info["registration"] says which was used, with inliers and residual). With the warp, `relight` gives
           the editor the warped reference with its light matched to the draft's (the registered paste's
           gain/offset), and `detail` adds back what the VAE loses of that reference, out + (a − decode(encode(a)))
           (RefineAnything: the VAE, not the editor, caps a region's detail; RefGC-SR2: high frequencies come
           from the reference); `paste_first` gives the editor the registered paste (the draft with the warped,
           relit reference pasted into the region) as its draft, so it refines a paste instead of redrawing the
           region (pixels outside the focus box are still the draft's)
    align_box  Align→Focus as Refine-by-Align does it: M* locates the region in the reference, the reference
           is cropped around M*'s box and upsampled, then Focus-and-Refine
The region reaches the model as the editor was trained to read it (`region`: none | context | draw, see
focus.region_contexts; default: the backbone's recipe, in its card).
Images: PIL images, (3, H, W) tensors in [0, 1] or (H, W, 3) arrays; masks likewise (H, W) / (1, H, W).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from . import focus as F_
from .align import Registration, register, registered_paste, relit_reference, soft_paste, warp_reference
from .data import as_image_tensor, as_mask_tensor, as_references, bbox_of, to_pil
from .editor import ADAPTERS, Refiner, edit, load_refiner, resolve_adapter  # noqa: F401  (resolve_adapter: for notebooks)
from .presets import get
from .sampling import check_steps

METHODS = ("input", "paste", "paste_warp", "full", "focus", "align", "align_box")
# labkit.refine's defaults: the val winner of notebook 05 (its claim defaults_chosen_on_val checks this;
# the golden test pins it)
REFINE_DEFAULTS = dict(method="align", blend=True, relight=True, detail=True, paste_first=True, residual=True)
ALIGN_SWITCHES = ("relight", "detail", "paste_first", "residual")  # the switches that act only with a registration


# ------------------------------------------------------------------------------------------------
# inputs
def resolve_seed(seed) -> int:
    """seed=None draws a fresh random seed (reported back in the output's info); else an integer."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % 2**31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, or None for a fresh random one; got {seed!r}")
    return int(seed)


# ------------------------------------------------------------------------------------------------
# the pieces
_REGISTRATIONS: dict = {}


def registration(img: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> Registration:
    """labkit.align.register, memoised on the pixels (several methods of one evaluation register the same case)."""
    key = hashlib.sha1(
        b"".join(t.contiguous().numpy().tobytes() for t in (img, mask, reference)) + bytes([seed % 256])
    ).hexdigest()
    if key not in _REGISTRATIONS:
        if len(_REGISTRATIONS) > 256:
            _REGISTRATIONS.clear()
        _REGISTRATIONS[key] = register(img, mask, reference, seed=seed)
    return _REGISTRATIONS[key]


def kontext_size(h: int, w: int, preset) -> tuple[int, int]:
    """The context/target size a preset works at: FLUX.1-Kontext's preferred resolution closest in aspect
    (the pipeline's auto-resize, max_area = resolution²), else the image's own sides floored to the multiple."""
    if preset.kontext_resolutions:
        # heavy: imported where used
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        _, pw, ph = min((abs(w / h - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
        return ph // preset.multiple * preset.multiple, pw // preset.multiple * preset.multiple
    return max(preset.multiple, h // preset.multiple * preset.multiple), max(
        preset.multiple, w // preset.multiple * preset.multiple
    )


def generate(
    image,
    prompt: str,
    references=None,
    *,
    preset: str = "mini",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = 0,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    true_cfg: float = 1.0,
    adapter: str | None = None,
    device: str = "cpu",
    auto_resize: bool | None = None,
):
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
    img = as_image_tensor(image, min_side=cfg.multiple)
    auto = cfg.kontext_resolutions if auto_resize is None else auto_resize
    hw = kontext_size(*img.shape[-2:], replace(cfg, kontext_resolutions=auto))
    if tuple(hw) != tuple(img.shape[-2:]):  # resized as the pipeline's image processor does (PIL, Lanczos)
        img = as_image_tensor(to_pil(img).resize((hw[1], hw[0]), Image.LANCZOS))
    size = (height or hw[0], width or hw[1])
    out = edit(
        r,
        img,
        as_references(references),
        steps,
        seed,
        prompt=prompt,
        latents=latents,
        size=size,
        guidance=guidance if guidance is not None else cfg.guidance,
        negative_prompt=negative_prompt,
        true_cfg=true_cfg,
    )
    pil = to_pil(out)
    pil.info.update(labkit_seed=seed, labkit_steps=steps)
    return pil


@torch.no_grad()
def correspondence(
    r: Refiner,
    draft: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    timesteps: Sequence[float] = (0.75, 0.5, 0.25),
    seed: int = 0,
) -> np.ndarray:
    """Refine-by-Align's M*: attention of the draft's in-mask queries to the reference's keys, averaged over
    timesteps and every block: (h, w) on the reference's token grid (h = H_ref // multiple), scaled to [0, 1]."""
    from . import attention as A  # pulls diffusers: imported where used

    bb = r.bb
    p = bb.multiple
    ref = F_.resize(reference, (reference.shape[-2] // p * p or p, reference.shape[-1] // p * p or p))
    z_d, z_r = bb.encode(draft[None]), bb.encode(ref[None])
    n_tok = z_d.shape[-2] * z_d.shape[-1] // 4
    n_ref = z_r.shape[-2] * z_r.shape[-1] // 4
    spec = A.CaptureSpec(
        queries={"draft": A.tokens_in_mask(mask, p, offset=n_tok)}, ref=slice(2 * n_tok, 2 * n_tok + n_ref)
    )
    g = torch.Generator().manual_seed(seed)
    with A.capture(bb.transformer, spec, n_image=2 * n_tok + n_ref) as rec:
        for t in timesteps:  # the draft noised to t stands in for the unknown target (SDEdit-style)
            eps = torch.randn(z_d.shape, generator=g)
            bb((1 - t) * z_d + t * eps, float(t), [z_d, z_r], prompt=r.prompt)
    m = torch.stack([v[0] / v[0].sum() for v in rec.maps.values()]).mean(0)
    return A.to_grid(m, (ref.shape[-2] // p, ref.shape[-1] // p))


def locate(
    r: Refiner,
    draft: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    timesteps: Sequence[float] = (0.75, 0.5, 0.25),
    seed: int = 0,
    thr: float = 0.5,
) -> tuple[int, int, int, int]:
    """Refine-by-Align: the box of M*'s largest component in the reference's pixels (correspondence; the
    average over timesteps and blocks beat any single (t, l) on mini, 01_attention_correspondence)."""
    from . import attention as A

    p = r.bb.multiple
    _, box = A.map_to_box(correspondence(r, draft, mask, reference, timesteps, seed), thr, p)
    sy = reference.shape[-2] / (reference.shape[-2] // p * p or p)
    sx = reference.shape[-1] / (reference.shape[-1] // p * p or p)  # back to the reference's pixels
    return int(box[0] * sx), int(box[1] * sy), int(round(box[2] * sx)), int(round(box[3] * sy))


def naive_paste(
    draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, reference_box, soft: bool = True
) -> torch.Tensor:
    """The reference's box resized into the mask's bounding box, blended by the (soft) mask: no model."""
    box = bbox_of(mask)
    src = F_.crop(reference, reference_box)
    s = F_.soft_mask(F_.crop(mask, box)) * F_.crop(mask, box).clamp(0, 1) if soft else F_.crop(mask, box)
    return F_.paste_back(draft, src, box, s if soft else F_.crop(mask, box))


def focus_refine(
    r: Refiner,
    draft: torch.Tensor,
    mask: torch.Tensor,
    references: Sequence[torch.Tensor],
    steps: int,
    seed: int,
    margin: float = 16,
    working_area: int | None = None,
    prompt: str | None = None,
    strength: float = 1.0,
    blend: bool = False,
    aligned: Sequence[torch.Tensor] = (),
    region: str | None = None,
    callback=None,
    detail: bool = False,
    start: torch.Tensor | None = None,
    residual: bool = False,
) -> tuple[torch.Tensor, tuple]:
    """Focus-and-Refine: crop + upsample to the working area, refine the crop, soft-paste back into the box.
    aligned: references already in the draft's frame (a registered warp): cropped by the same box, placed first.
    detail: add back what the VAE loses of the aligned reference, out + (a − decode(encode(a))), so the output is
    not capped by the VAE's reconstruction where the editor copies the reference (needs `aligned`).
    start: the image the editor refines instead of the draft (same size, e.g. the registered paste); the
    result is still pasted back into the draft.
    residual (with start): paste back only the editor's change to the start's (upsampled) crop (focus.paste_back
    residual_of), so the start's detail that the editor kept does not pass through the crop's up-and-down resampling
    (not with the draft as the start: there it would keep the wrong content's fine detail)."""
    area = working_area or r.bb.preset.resolution**2  # the preset's working area (mini 128², flux-kontext 1024²)
    c_img, c_mask, box = F_.focus_crop(draft, mask, area, r.bb.multiple, margin)
    if start is not None:
        c_img = F_.resize(F_.crop(start, box), c_img.shape[-2:])
    refs = [F_.resize(F_.crop(a, box), c_img.shape[-2:]) for a in aligned] + list(references)
    out = edit(
        r,
        c_img,
        refs,
        steps,
        seed,
        budget=area,
        prompt=prompt,
        strength=strength,
        mask=c_mask,
        blend=blend,
        region=region,
        callback=callback,
    )
    if detail and aligned:
        a = refs[0]  # (3, h, w): the aligned reference's crop, as the editor saw it
        out = (out + a - r.bb.roundtrip(a[None].to(r.bb.device))[0].float().cpu()).clamp(0, 1)
    soft = F_.soft_mask(F_.crop(mask, box), dilate=5, blur_radius=3.0)
    base = F_.crop(start, box) if residual and start is not None else None
    return F_.paste_back(draft, out, box, soft, residual_of=base), box


# ------------------------------------------------------------------------------------------------
def refine_tensor(
    image,
    mask,
    reference=None,
    method: str | None = None,
    adapter: str | None = None,
    steps: int | None = None,
    seed: int | None = 0,
    preset: str = "mini",
    device: str = "cpu",
    reference_box=None,
    margin: float = 16,
    working_area: int | None = None,
    prompt: str | None = None,
    strength: float = 1.0,
    blend: bool | None = None,
    region: str | None = None,
    callback=None,
    relight: bool | None = None,
    detail: bool | None = None,
    paste_first: bool | None = None,
    residual: bool | None = None,
) -> tuple[torch.Tensor, dict]:
    """refine() on tensors: returns the (3, H, W) result and what was done (boxes, prompt, adapter, seed,
    region encoding, registration). callback(i, n, x0) after every sampling step (edit). relight: with a
    registration (method align), give the editor the warped reference with its light matched to the draft's
    (the registered paste's gain/offset) instead of the warped reference as it is; other methods ignore it, as they
    ignore detail, paste_first (the editor refines the registered paste instead of the draft) and residual (with
    paste_first: only the editor's change to the paste is resampled back into the box)."""
    given = dict(blend=blend, relight=relight, detail=detail, paste_first=paste_first, residual=residual)
    blend, relight, detail, paste_first, residual = (
        REFINE_DEFAULTS[k] if v is None else bool(v) for k, v in given.items()
    )
    method = REFINE_DEFAULTS["method"] if method is None else method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    steps, seed = check_steps(steps if steps is not None else get(preset).steps), resolve_seed(seed)
    unit = 1 if method == "input" else get(preset).multiple  # the model methods need one packing unit a side
    img = as_image_tensor(image, min_side=unit)
    m = as_mask_tensor(mask, img.shape[-2:])
    refs = as_references(reference, min_side=unit)
    info: dict = dict(method=method, adapter=adapter, seed=seed, steps=steps)
    if method == "input":
        return img.clone(), info
    if region is not None and region not in F_.REGION_ENCODINGS:
        raise ValueError(f"unknown region encoding {region!r}; choose from {F_.REGION_ENCODINGS}")
    if method in ("paste", "paste_warp", "align", "align_box") and not refs:
        raise ValueError(
            f"method {method!r} needs a reference image; pass reference=... or use 'focus'/'full' (reference-free)"
        )
    if method == "paste_warp":
        reg = registration(img, m, refs[0], seed)
        info["registration"] = reg.describe()
        if reg.ok:
            return registered_paste(img, m, refs[0], reg), info
        method = "paste"  # the fit was poor: the naive paste (M* box), and the info says so
    r = load_refiner(preset, adapter, device) if method != "paste" or reference_box is None else None
    if method == "paste":
        box = (
            reference_box
            if reference_box is not None
            else locate(load_refiner(preset, None, device), img, m, refs[0], seed=seed)
        )
        info["reference_box"] = tuple(int(v) for v in box)
        return naive_paste(img, m, refs[0], box), info
    info["prompt"], info["region"] = prompt or r.prompt, region or r.region
    if method == "full":
        return edit(
            r,
            img,
            refs,
            steps,
            seed,
            prompt=prompt,
            strength=strength,
            mask=m,
            blend=blend,
            region=region,
            callback=callback,
        ), info
    aligned, start = [], None
    if method == "align":
        reg = registration(img, m, refs[0], seed)
        info["registration"] = reg.describe()
        if reg.ok:
            hw = tuple(img.shape[-2:])
            relit = relit_reference(refs[0], reg, hw) if relight or paste_first else None
            warped = relit if relight else warp_reference(refs[0], reg.matrix, hw)
            if paste_first:  # the registered paste (align.registered_paste), from the relit reference at hand
                start = soft_paste(img, m, relit)
            aligned, refs = [warped], refs[1:]
            # with the warp; the box fallback uses none of them
            info.update(relight=relight, detail=detail, paste_first=paste_first, residual=residual and paste_first)
    if method == "align_box" or (method == "align" and not aligned):
        from .attention import crop_reference

        rbox = reference_box if reference_box is not None else locate(r, img, m, refs[0], seed=seed)
        info["reference_box"] = tuple(int(v) for v in rbox)
        refs = [crop_reference(refs[0], rbox, out_size=None, multiple=r.bb.multiple)] + refs[1:]
    out, box = focus_refine(
        r,
        img,
        m,
        refs,
        steps,
        seed,
        margin,
        working_area,
        prompt,
        strength,
        blend,
        aligned,
        region,
        callback,
        detail,
        start,
        residual,
    )
    info["box"] = tuple(int(v) for v in box)
    return out, info


def refine(
    image,
    mask,
    reference=None,
    method: str | None = None,
    adapter: str | None = None,
    steps: int | None = None,
    seed: int | None = 0,
    preset: str = "mini",
    prompt: str | None = None,
    **kw,
):
    """Refine the masked region of `image` (optionally from reference image(s)); PIL image of the input's size
    (its .info['labkit_seed'] holds the seed used: seed=None draws a fresh one).

    method: input | paste | full | focus | align (module docstring); adapter: None (frozen editor), a name
    under figures/04_train_freqmole/adapters (lora, freqmole, freqmole+freq, freqmole+boundary) or a folder."""
    out, info = refine_tensor(image, mask, reference, method, adapter, steps, seed, preset, prompt=prompt, **kw)
    pil = to_pil(out)
    pil.info.update(
        labkit_seed=info["seed"], labkit_method=info["method"], labkit_info=info
    )  # seed=None: the seed that was drawn
    return pil


def describe_adapters() -> dict:
    """name -> adapter.json of every committed adapter (provenance for results.json)."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(ADAPTERS.glob("*/adapter.json"))}
