"""The editor: a loaded backbone (+ optional adapter) and the one editing call, `edit`: Kontext-style sampling
of a target from the contexts [draft, the region as the editor reads it, references]. `labkit.inference` (refine,
generate), `labkit.rl` and the studio call it; it takes tensors that were checked at their entry."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import focus as F_
from .images import resize_mask
from .models import MEMORY, load, pack_references
from .presets import editor_region
from .sampling import sample
from .util import REPO

ADAPTERS = REPO / "figures" / "04_train_freqmole" / "adapters"  # the committed adapters of notebook 04


@dataclass
class Refiner:
    """A loaded backbone (+ optional adapter) and the instruction it was trained with."""

    bb: object
    prompt: str
    adapter: str | None = None
    provenance: dict = field(default_factory=dict)
    region: str = "none"  # how the region reaches the editor (focus.region_contexts), as its recipe trained it


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """An adapter folder by path (the folder, or a training run's --out holding adapter/), or by name under
    figures/04_train_freqmole/adapters."""
    from . import adapters as AD  # pulls peft: imported where used

    for p in (Path(adapter), ADAPTERS / str(adapter)):
        try:
            return AD.adapter_folder(p)
        except FileNotFoundError:
            pass
    have = sorted(p.name for p in ADAPTERS.glob("*") if (p / "adapter.json").exists()) if ADAPTERS.exists() else []
    raise FileNotFoundError(
        f"no adapter {str(adapter)!r} (looked for adapter.json in {adapter}, {Path(adapter) / 'adapter'} and "
        f"{ADAPTERS / str(adapter)}); available: {have or 'none'} - run `make figures NB=04_train_freqmole` to "
        "train them"
    )


def load_refiner(preset: str = "mini", adapter: str | None = None, device: str = "cpu") -> Refiner:
    """The frozen editor (adapter=None) or the editor with an adapter folder/name (cached per memory options)."""
    return _load_refiner(preset, adapter, device, tuple(MEMORY.items()))


@functools.lru_cache(maxsize=8)
def _load_refiner(preset: str, adapter: str | None, device: str, memory: tuple) -> Refiner:
    """load_refiner's cached body; `memory` (models.MEMORY) is part of the key, so new options load anew."""
    from . import adapters as AD

    bb = load(preset, device=device)
    region = editor_region(str(preset))
    if adapter is None:
        return Refiner(bb, "refine", region=region)
    folder = resolve_adapter(adapter)
    spec = AD.load(bb.transformer, folder, identity=bb.identity())
    bb.eval().requires_grad_(False)
    sha = hashlib.sha256((folder / "adapter.safetensors").read_bytes()).hexdigest()
    return Refiner(
        bb,
        spec.get("sft", {}).get("prompt", "refine"),
        str(folder),
        dict(
            folder=str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder),
            sha256=sha,
            kind=spec["kind"],
            rank=spec["rank"],
            sft=spec.get("sft"),
            training=spec.get("training"),
        ),
        spec.get("sft", {}).get("region", region),
    )


@torch.no_grad()
def edit(
    r: Refiner,
    draft: torch.Tensor,
    references: Sequence[torch.Tensor],
    steps: int,
    seed: int,
    *,
    budget: int | None = None,
    prompt: str | None = None,
    guidance: float | None = None,
    latents: torch.Tensor | None = None,
    size: tuple[int, int] | None = None,
    negative_prompt: str | None = None,
    true_cfg: float = 1.0,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    blend: bool = False,
    region: str | None = None,
    callback=None,
) -> torch.Tensor:
    """Kontext-style sampling of a target (size: draft's by default) from contexts [draft (id 1), references
    (ids 2..) packed under a pixel budget (SELF)]: (3, H, W) in [0, 1]. latents: the initial noise, packed
    (1, seq, 64) as the pipeline takes it or (1, 16, h, w); else drawn from `seed` exactly as the pipeline draws it.
    strength < 1: start from the draft's latents noised to that level (img2img). mask (1, H, W): the region, given
    to the editor as `region` says (none | context | draw; default the refiner's); blend=True also keeps the draft's
    latents outside the (dilated) mask after every step (FluxKontextInpaintPipeline's way). callback(i, n, x0):
    after every step, with the step's x0 prediction (latents; sampling.sample), e.g. for a filmstrip or to cancel."""
    bb = r.bb
    h, w = size or draft.shape[-2:]
    if h % bb.multiple or w % bb.multiple:  # the draft's own sides are Backbone.encode's check
        raise ValueError(
            f"target sides must be multiples of {bb.multiple} for the model path; got {h}x{w}: ask for "
            f"{h // bb.multiple * bb.multiple}x{w // bb.multiple * bb.multiple} or use method='focus'"
        )
    refs = pack_references(list(references), budget or h * w, bb.multiple) if references else []
    if mask is not None and tuple(mask.shape[-2:]) != tuple(draft.shape[-2:]):
        raise ValueError(
            f"mask is {tuple(mask.shape[-2:])} but the image is {tuple(draft.shape[-2:])}: give the mask at "
            "the image's size"
        )
    if blend and mask is None:
        raise ValueError("blend=True keeps the draft outside the region: it needs the region's mask")
    images = F_.region_contexts(draft, mask, refs, region or r.region) if mask is not None else [draft, *refs]
    ctx = [bb.encode(x[None].to(bb.device)) for x in images]
    shape = (1, ctx[0].shape[1], h // bb.factor, w // bb.factor)
    if latents is not None and latents.ndim == 3:  # packed, as FluxKontextPipeline(latents=...) takes them
        latents = bb.unpack(latents, shape[-2], shape[-1])
    neg = bb.encode_prompt(negative_prompt, batch=1) if negative_prompt is not None and true_cfg > 1 else None
    init = keep = keep_mask = None
    if strength < 1 or blend:
        if (h, w) != tuple(draft.shape[-2:]):
            raise ValueError("strength < 1 and mask blending need the target at the draft's size")
        init = keep = bb.encode(
            draft[None].to(bb.device)
        )  # the draft itself (context 1 may carry the region drawn on it)
        if blend:  # latent cells the mask touches (dilated by one cell) are generated; the rest kept
            m = resize_mask(mask[None], shape[-2:], "touched")
            keep_mask = 1 - torch.nn.functional.max_pool2d(m, 3, 1, 1).to(bb.device)
        else:
            keep = None
    z = sample(
        bb,
        ctx,
        prompt or r.prompt,
        shape=shape,
        steps=steps,
        generator=torch.Generator().manual_seed(seed),
        latents=latents,
        guidance=guidance,
        negative_embeds=neg,
        true_cfg=true_cfg,
        init=init,
        strength=strength,
        keep=keep,
        keep_mask=keep_mask,
        callback=callback,
    )
    return bb.decode(z)[0].float().cpu()
