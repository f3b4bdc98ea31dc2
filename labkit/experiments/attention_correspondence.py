"""Notebook 01_attention_correspondence's experiment code: M* of every (query set, timestep, block) for a
triplet, and the chance level of a box."""

from __future__ import annotations

import numpy as np
import torch

from ..attention import CaptureSpec, box_iou, capture, tokens_in_mask
from ..sampling import sample


@torch.no_grad()
def triplet_maps(
    bb,
    trip,
    timesteps,
    path: str = "teacher",
    sample_steps: int = 8,
    prompt: str = "restore",
    seed: int = 0,
    renorm: bool = True,
) -> tuple[dict, tuple[int, int]]:
    """M[(query set, t, block)] (N_ref,) for one triplet, on the teacher-forced path (true target noised to
    each t) or on the model's own Euler sampling path from noise (t = the sampler's steps)."""
    size = trip.target.shape[-1]
    up = trip.draft[None]
    z_gt, z_draft, z_ref = bb.encode(trip.target[None]), bb.encode(up), bb.encode(trip.reference[None])
    patch = bb.multiple
    span = bb.token_spans([z.shape[-2:] for z in (z_gt, z_draft, z_ref)], ("target", "draft", "reference"))
    spec = CaptureSpec(
        queries={
            "target": tokens_in_mask(trip.mask, patch, offset=span["target"].start),
            "draft": tokens_in_mask(trip.mask, patch, offset=span["draft"].start),
        },
        ref=span["reference"],
        renorm=renorm,
    )
    g = torch.Generator().manual_seed(seed)
    with capture(bb.transformer, spec, n_image=span["reference"].stop) as rec:
        if path == "teacher":
            for t in timesteps:
                eps = torch.randn(z_gt.shape, generator=g).to(z_gt)
                bb((1 - t) * z_gt + t * eps, float(t), [z_draft, z_ref], prompt=prompt)
        else:
            sample(bb, [z_draft, z_ref], prompt, shape=tuple(z_gt.shape), steps=sample_steps, generator=g)
    return {k: v[0] for k, v in rec.maps.items()}, (size // patch, size // patch)


def chance_box_iou(box, gt, size: int, rng: np.random.Generator, n: int = 200) -> float:
    """Expected IoU with gt of a box of the same size as `box` placed uniformly at random in the image."""
    w, h = box[2] - box[0], box[3] - box[1]
    xs, ys = rng.integers(0, size - w + 1, n), rng.integers(0, size - h + 1, n)
    return float(np.mean([box_iou((x, y, x + w, y + h), gt) for x, y in zip(xs, ys)]))
