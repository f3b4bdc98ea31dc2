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
           tone curve), and `vae_detail` adds back what the VAE loses of that reference, out + (a − decode(encode(a)))
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

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from PIL import Image

from . import focus as F_
from .align import REGISTRATIONS, Registration, registered_paste, relit_reference, ring_of, soft_paste, warp_reference
from .editor import ADAPTERS, Refiner, edit, load_refiner, resolve_adapter  # noqa: F401  (resolve_adapter: for notebooks)
from .frequency import lowpass_witness, translate, witness_shift
from .images import as_image_tensor, as_mask_tensor, as_references, resize, to_pil
from .metrics import psnr, region_psnr
from .presets import get
from .sampling import check_steps


# ------------------------------------------------------------------------------------------------
# the options
def _opt(default, help: str, switch: str = ""):
    """A RefineOptions field with its help text; switch='align' marks one that acts only with a registration."""
    return field(default=default, metadata=dict(help=help, switch=switch))


@dataclass(frozen=True)
class RefineOptions:
    """labkit.refine's options. The method and switches default to notebook 05's val winner (its claim
    defaults_chosen_on_val checks this; the golden test pins it). The CLI's flags and the studio's checkboxes are
    made from these fields."""

    method: str = _opt("align", "how to refine (METHOD_DOCS)")
    blend: bool = _opt(True, "keep the draft's latents outside the region at every step", "model")
    relight: bool = _opt(True, "the warped reference with its light matched to the draft's", "align")
    vae_detail: bool = _opt(True, "add back what the VAE loses of the aligned reference", "align")
    paste_first: bool = _opt(True, "the editor refines the registered paste instead of the draft", "align")
    residual: bool = _opt(True, "with paste_first: resample only the editor's change to the paste back", "align")
    accept: bool = _opt(
        True,
        "do no harm: keep the editor's output, the registered paste (or shifted to a blurred draft) or the draft",
        "model",
    )
    strength: float = _opt(1.0, "< 1 starts from the draft noised to that level")
    region: str | None = _opt(None, "how the region reaches the editor: none | context | draw (default: its recipe)")
    prompt: str | None = _opt(None, "instruction / free text (default: the editor's)")
    steps: int | None = _opt(None, "sampler steps (default: the preset's)")
    resolution: int | None = _opt(
        None, "working side of the focus crop in pixels (default: the preset's; 512 on a small card)"
    )
    seed: int | None = _opt(0, "sampling / RANSAC seed (None: a fresh random one, reported in info)")
    adapter: str | None = _opt(None, "adapter folder or committed name (default: the frozen editor)")
    preset: str = _opt("mini", "tiny | mini | flux-kontext | a FluxKontextPipeline folder")
    device: str = _opt("cpu", "torch device")

    def checked(self) -> RefineOptions:
        """A copy with steps and seed resolved; a bad option raises ValueError naming the fix."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {tuple(METHODS)}")
        if self.region is not None and self.region not in F_.REGION_ENCODINGS:
            raise ValueError(f"unknown region encoding {self.region!r}; choose from {F_.REGION_ENCODINGS}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        steps = check_steps(self.steps if self.steps is not None else get(self.preset).steps)
        if self.resolution is not None and not (isinstance(self.resolution, int) and self.resolution >= 16):
            raise ValueError(
                f"resolution (--resolution) is the focus crop's working side in pixels, >= 16; got {self.resolution!r}"
            )
        return replace(self, steps=steps, seed=resolve_seed(self.seed), device=check_device(self.device))


SWITCHES = tuple(f.name for f in fields(RefineOptions) if f.type == "bool")  # the on/off options
ALIGN_SWITCHES = tuple(f.name for f in fields(RefineOptions) if f.metadata["switch"] == "align")
RENAMED = {"detail": "vae_detail"}  # old option names refine still accepts (the RL reward's `detail` is another idea)
REFINE_DEFAULTS = {k: getattr(RefineOptions(), k) for k in ("method", *SWITCHES)}  # what 05 chooses on val


def resolve_seed(seed) -> int:
    """seed=None draws a fresh random seed (reported back in the output's info); else an integer."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % 2**31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(
            f"seed (--seed) must be an integer in 0..2**32-1, or None for a fresh random one; got {seed!r}"
        )
    return int(seed)


def check_device(device: str) -> str:
    """A torch device this machine has: 'cpu', or 'cuda[:i]' / 'mps' when available; else ValueError naming --device."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device (--device) {device!r} is not a torch device: use cpu, cuda or cuda:0") from None
    ok = d.type == "cpu" or (
        d.type == "cuda" and torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()
    )
    ok = ok or (d.type == "mps" and torch.backends.mps.is_available())
    if not ok:
        raise ValueError(f"device (--device) {device!r} is not available on this machine: use --device cpu")
    return device


# ------------------------------------------------------------------------------------------------
# one refine: the checked inputs, the options and what was done
@dataclass
class Job:
    """What every method reads: the checked draft (3, H, W), region (1, H, W), references [(3, h, w)], options."""

    img: torch.Tensor
    mask: torch.Tensor
    refs: list
    opts: RefineOptions
    info: dict
    reference_box: tuple | None = None  # the region's box in the reference, when known (else M* locates it)
    callback: Callable | None = None  # callback(i, n, x0) after every sampling step

    def refiner(self, adapter: bool = True) -> Refiner:
        """The editor (with the options' adapter, or frozen), cached by editor.load_refiner."""
        return load_refiner(self.opts.preset, self.opts.adapter if adapter else None, self.opts.device)

    def register(self) -> Registration:
        """The first reference registered into the draft's frame (align.REGISTRATIONS caches it); info records it."""
        reg = REGISTRATIONS(self.img, self.mask, self.refs[0], self.opts.seed)
        self.info["registration"] = reg.describe()
        return reg

    def reference_box_or_locate(self, r: Refiner) -> tuple:
        """The given reference box, or M*'s (attention.locate); info records it."""
        from .attention import locate  # pulls diffusers: imported where used

        box = self.reference_box
        if box is None:
            box = locate(r, self.img, self.mask, self.refs[0], seed=self.opts.seed)
        self.info["reference_box"] = tuple(int(v) for v in box)
        return box


def fall_back(job: Job, to: str, why: str) -> torch.Tensor:
    """Run method `to` instead of the one asked; info["fallback"] says to what and why."""
    job.info["fallback"] = dict(to=to, why=why)
    return METHODS[to](job)


def focus_refine(
    job: Job, references: list, aligned: list = (), start: torch.Tensor | None = None, margin: float = 16
) -> torch.Tensor:
    """Focus-and-Refine: crop + upsample to the preset's working area, refine the crop, soft-paste back into the box.
    aligned: references in the draft's frame (a registered warp), cropped by the same box and placed first; with
    `vae_detail`, what the VAE loses of the first is added back, out + (a − decode(encode(a))). start: the image the
    editor refines instead of the draft (the registered paste); with `residual` only the editor's change to the
    start's crop is resampled back (focus.paste_back residual_of), so the start's kept detail skips the resampling."""
    r, o = job.refiner(), job.opts
    area = (o.resolution or r.bb.preset.resolution) ** 2  # working area (presets: mini 128², flux-kontext 1024²)
    c_img, c_mask, box = F_.focus_crop(job.img, job.mask, area, r.bb.multiple, margin)
    if start is not None:
        c_img = resize(F_.crop(start, box), c_img.shape[-2:])
    refs = [resize(F_.crop(a, box), c_img.shape[-2:]) for a in aligned] + list(references)
    out = edit(
        r,
        c_img,
        refs,
        o.steps,
        o.seed,
        budget=area,
        prompt=o.prompt,
        strength=o.strength,
        mask=c_mask,
        blend=o.blend,
        region=o.region,
        callback=job.callback,
    )
    if o.vae_detail and aligned:  # refs[0]: the aligned reference's crop, as the editor saw it
        out = (out + refs[0] - r.bb.roundtrip(refs[0][None].to(r.bb.device))[0].float().cpu()).clamp(0, 1)
    base = F_.crop(start, box) if o.residual and start is not None else None
    job.info |= dict(box=tuple(int(v) for v in box), resolution=round(area**0.5))
    return F_.paste_back(job.img, out, box, F_.seam_mask(F_.crop(job.mask, box)), residual_of=base)


# ------------------------------------------------------------------------------------------------
# do no harm: a target-free choice among the editor's output, the registered paste (or it shifted) and the draft
# the thresholds, chosen on val (bench/accept_rule.py --n 48: the best mean region PSNR with <= 5% of each set's val
# cases harmed and no registered val case more than 0.5 dB below the registered paste; when no rule meets both, the
# fewest harmed among those with none below the paste; ties go to the safer choice; 48 val cases per set and kind, the
# non-planar set drawn as 05's test, 3 px; when a registration holds is align.register's rule, chosen before on val
# by bench/registration_rule.py). On mini (editor_refine3, the registration's light as a tone curve) val chose:
# - never the editor where a registration holds (agree 101 dB: the registered paste beat it);
# - without one, the editor only when it continues the draft on the ring to 30 dB (3 of 80 unregistered val cases,
#   each far above the draft; at 20 dB 20 of 31 fell below the draft);
# - never the draft by the margin rule (101 dB: every lower margin kept it on some case where the paste was right);
# - a blurred draft (fine share < 0.3) that correlates with the blurred paste (corr > 0.75: four wrong-word val drafts
#   with little fine detail of their own passed the fine-share test, and there the paste was 11-19 dB better) is a
#   witness of the target's low frequencies: the paste is first shifted to it when that divides their error at least
#   2-fold and the sharp ring just outside the region does not refuse the shift (its error ratio <= 1.5: without the
#   ring test, two planar smear drafts, whose smear displaces the region, pulled a right paste 2 and 8 dB down);
#   then the draft is kept if the paste, shifted or not, still misses it by more than 0.6 of the detail it adds.
# Worst val set 2.1% harmed, 0 below the paste (2.8% without the shift, 7.6% without the witness: non-planar).
ACCEPT_AGREE_DB = 101.0  # keep the editor's output when it agrees with the aligned reference in the region this well
ACCEPT_SEAM_DB = 30.0  # without a registration, keep it only when it agrees with the draft on the ring this well
ACCEPT_DRAFT_MARGIN_DB = 101.0  # keep the draft when it agrees with the paste this much better than the ring does
ACCEPT_FINE_SHARE = 0.3  # a draft with less of the paste's finest detail than this is read as blurred (a witness)
ACCEPT_LOWPASS_GAP = 0.6  # keep such a draft when the paste misses its low frequencies by this share of what it adds
ACCEPT_WITNESS_CORR = 0.75  # ... and the draft correlates with the blurred paste above this (the same content)
ACCEPT_SHIFT_GAIN = 2.0  # shift the paste to the witness when that divides its low-pass error by this much
ACCEPT_SHIFT_RING = 1.5  # ... and the ring just outside the region, sharp, does not refuse it (error ratio <= this)
RING = dict(margin=1, width=8)  # where the registration's own error is read: just outside the region


def evidence_ring(mask: torch.Tensor) -> torch.Tensor:
    """(1, H, W) float: the RING band around mask (1, H, W), where the draft is intact and the evidence is read."""
    return torch.from_numpy(ring_of(mask, **RING))[None].float()


def paste_evidence(draft: torch.Tensor, mask: torch.Tensor, aligned: torch.Tensor, paste: torch.Tensor) -> dict:
    """Target-free evidence about a registered paste: `inside` (dB), the draft's agreement with the paste in the
    region; `ring` (dB), the aligned reference's agreement with the draft on the ring, where the draft is right (the
    registration's own error); margin = inside - ring; and the draft read as a low-pass witness of the target
    (frequency.lowpass_witness: fine_share, sigma, gap)."""
    ring = evidence_ring(mask)
    inside, ring_db = region_psnr(paste, draft, mask), float(psnr(aligned[None], draft[None], ring[None])[0])
    ev = dict(inside_db=round(inside, 2), ring_db=round(ring_db, 2), margin_db=round(inside - ring_db, 2))
    return ev | lowpass_witness(draft, paste, mask)


def accept_check(out: torch.Tensor, draft: torch.Tensor, mask: torch.Tensor, aligned: torch.Tensor | None,
                 paste: torch.Tensor | None) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Choose what to return from evidence available at inference (no target). With a registration (aligned: the
    relit warped reference, paste: the registered paste): the draft if it already agrees with the paste by
    ACCEPT_DRAFT_MARGIN_DB more than the registration's own error (paste_evidence). If the draft is a blurred witness
    (fine_share < ACCEPT_FINE_SHARE, corr > ACCEPT_WITNESS_CORR): the paste shifted to the draft's low frequencies
    when that lowers their error ACCEPT_SHIFT_GAIN-fold and the ring just outside the region allows it (error ratio
    <= ACCEPT_SHIFT_RING; witness_shift: a paste a few px off a non-planar surface, its surroundings moved too),
    and the draft if the paste, shifted or not, still misses them (gap > ACCEPT_LOWPASS_GAP). Else the editor's
    output if its region agrees with the aligned reference to ACCEPT_AGREE_DB, else the paste. Without one: the
    output if it agrees with the draft on the ring just outside the region to ACCEPT_SEAM_DB, else the draft.
    Returns (image, why: the kept candidate and the evidence)."""
    near = torch.from_numpy(ring_of(mask, margin=1, width=3))[None].float()
    seam = float(psnr(out[None], draft[None], near[None])[0])
    if aligned is not None:
        ev = paste_evidence(draft, mask, aligned, paste) | dict(seam_db=round(seam, 2))
        if ev["margin_db"] >= ACCEPT_DRAFT_MARGIN_DB:
            return draft.clone(), dict(kept="draft", why="the draft already agrees with the registered paste", **ev)
        if ev["fine_share"] < ACCEPT_FINE_SHARE and ev["corr"] > ACCEPT_WITNESS_CORR:
            ev |= witness_shift(draft, aligned, mask, ring=evidence_ring(mask))
            kept, cand = "paste", paste
            if ev["shift_gain"] >= ACCEPT_SHIFT_GAIN and ev["ring_ratio"] <= ACCEPT_SHIFT_RING:
                moved = translate(aligned[None], torch.tensor([ev["dx"]]), torch.tensor([ev["dy"]]))[0]
                kept, cand = "shifted paste", soft_paste(draft, mask, moved)
                ev["shifted_gap"] = lowpass_witness(draft, cand, mask)["gap"]
            if ev.get("shifted_gap", ev["gap"]) > ACCEPT_LOWPASS_GAP:
                why = f"the draft is blurred and the {kept} misses its low frequencies by more than the detail it adds"
                return draft.clone(), dict(kept="draft", why=why, **ev)
            if kept == "shifted paste":
                return cand, dict(kept=kept, why="the draft's low frequencies place the paste better", **ev)
        agree = region_psnr(out, aligned, mask)
        kept = "editor" if agree >= ACCEPT_AGREE_DB else "paste"
        return (out if kept == "editor" else paste), dict(kept=kept, agree_db=round(agree, 2), **ev)
    kept = "editor" if seam >= ACCEPT_SEAM_DB else "draft"
    return (out if kept == "editor" else draft.clone()), dict(kept=kept, seam_db=round(seam, 2), registration=False)


# ------------------------------------------------------------------------------------------------
# the methods: one short function each (Job -> (3, H, W))
def run_input(job: Job) -> torch.Tensor:
    """The draft itself, untouched (no model)."""
    return job.img.clone()


def run_paste(job: Job) -> torch.Tensor:
    """The reference's region (reference_box, else M*'s box) resized into the mask's box, soft-blended (no model)."""
    box = job.reference_box_or_locate(job.refiner(adapter=False) if job.reference_box is None else None)
    return F_.naive_paste(job.img, job.mask, job.refs[0], box)


def run_paste_warp(job: Job) -> torch.Tensor:
    """The registered paste: the reference warped into the draft's frame, relit, pasted with a soft seam."""
    reg = job.register()
    if not reg.ok:
        return fall_back(job, "paste", reg.reason)
    return registered_paste(job.img, job.mask, job.refs[0], reg)


def run_full(job: Job) -> torch.Tensor:
    """Kontext-style: the whole image regenerated from [draft, references] (RefGC-SR2's setting)."""
    o = job.opts
    return edit(
        job.refiner(),
        job.img,
        job.refs,
        o.steps,
        o.seed,
        prompt=o.prompt,
        strength=o.strength,
        mask=job.mask,
        blend=o.blend,
        region=o.region,
        callback=job.callback,
    )


def run_focus(job: Job) -> torch.Tensor:
    """Focus-and-Refine (RefineAnything) from the references as given."""
    return focus_refine(job, job.refs)


def run_align(job: Job) -> torch.Tensor:
    """Align as a warp, then Focus: the registered reference (relit) is the first context, cropped by the same
    box; with paste_first the editor refines the registered paste. A failed registration falls back to align_box."""
    reg, o = job.register(), job.opts
    if not reg.ok:
        return fall_back(job, "align_box", reg.reason)
    hw = tuple(job.img.shape[-2:])
    relit = relit_reference(job.refs[0], reg, hw) if o.relight or o.paste_first else None
    warped = relit if o.relight else warp_reference(job.refs[0], reg.matrix, hw, reg.flow)
    start = soft_paste(job.img, job.mask, relit) if o.paste_first else None  # = align.registered_paste
    job.info.update({k: getattr(o, k) for k in ALIGN_SWITCHES} | dict(residual=o.residual and o.paste_first))
    out = focus_refine(job, job.refs[1:], aligned=[warped], start=start)
    if not o.accept:
        return out
    relit = relit if relit is not None else relit_reference(job.refs[0], reg, hw)
    paste = start if start is not None else soft_paste(job.img, job.mask, relit)
    out, job.info["accept"] = accept_check(out, job.img, job.mask, relit, paste)
    return out


def run_align_box(job: Job) -> torch.Tensor:
    """Align→Focus as Refine-by-Align does it: M* locates the region in the reference, which is cropped around
    M*'s box and upsampled, then Focus-and-Refine."""
    from .attention import crop_reference

    r = job.refiner()
    box = job.reference_box_or_locate(r)
    out = focus_refine(job, [crop_reference(job.refs[0], box, out_size=None, multiple=r.bb.multiple), *job.refs[1:]])
    if not job.opts.accept:
        return out
    out, job.info["accept"] = accept_check(out, job.img, job.mask, None, None)
    return out


METHODS: dict[str, Callable[[Job], torch.Tensor]] = dict(
    input=run_input,
    paste=run_paste,
    paste_warp=run_paste_warp,
    full=run_full,
    focus=run_focus,
    align=run_align,
    align_box=run_align_box,
)
NEEDS_REFERENCE = ("paste", "paste_warp", "align", "align_box")
METHOD_DOCS = {k: f.__doc__.split("\n")[0] for k, f in METHODS.items()}


# ------------------------------------------------------------------------------------------------
# the entry
def refine_tensor(
    image, mask, reference=None, opts: RefineOptions | None = None, *, reference_box=None, callback=None, **kw
) -> tuple[torch.Tensor, dict]:
    """refine() on tensors: the (3, H, W) result and what was done (method, boxes, registration, fallback, seed...).
    opts: RefineOptions; kw override its fields (None keeps the option's default, except seed=None: a fresh seed)."""
    kw = {RENAMED.get(k, k): v for k, v in kw.items()} if RENAMED.keys() & kw.keys() else kw
    o = replace(opts or RefineOptions(), **{k: v for k, v in kw.items() if v is not None or k == "seed"}).checked()
    unit = 1 if o.method == "input" else get(o.preset).multiple  # the model methods need one packing unit a side
    img = as_image_tensor(image, min_side=unit)
    job = Job(
        img,
        as_mask_tensor(mask, img.shape[-2:]),
        as_references(reference, min_side=unit),
        o,
        dict(method=o.method, adapter=o.adapter, seed=o.seed, steps=o.steps),
        reference_box,
        callback,
    )
    if o.method in NEEDS_REFERENCE and not job.refs:
        raise ValueError(
            f"method {o.method!r} needs a reference image; pass reference=... or use 'focus'/'full' (reference-free)"
        )
    if o.method not in ("input", "paste", "paste_warp"):
        r = job.refiner()
        job.info |= dict(prompt=o.prompt or r.prompt, region=o.region or r.region)
    return METHODS[o.method](job), job.info


def refine(image, mask, reference=None, method: str | None = None, **kw):
    """Refine the masked region of `image` (optionally from reference image(s)); PIL image of the input's size
    (.info['labkit_seed'] holds the seed used: seed=None draws a fresh one; .info['labkit_info'] what was done).

    method: one of METHODS (METHOD_DOCS; default the val winner); kw: RefineOptions' fields (adapter: None for the
    frozen editor, a name under figures/04_train_freqmole/adapters or a folder; steps, seed, preset, prompt ...)."""
    out, info = refine_tensor(image, mask, reference, method=method, **kw)
    pil = to_pil(out)
    pil.info.update(labkit_seed=info["seed"], labkit_method=info["method"], labkit_info=info)
    return pil


# ------------------------------------------------------------------------------------------------
# Kontext-style whole-image editing (no region)
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


def describe_adapters() -> dict:
    """name -> adapter.json of every committed adapter (provenance for results.json)."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(ADAPTERS.glob("*/adapter.json"))}
