"""Notebook 02_latent_frequency's experiment code (RefGC-SR2 Fig. 5): LF/HF similarity across depth and
which latents (LRGI, the upsampled draft, or HRRI) lie closer to HRGT."""

from __future__ import annotations

import numpy as np
import torch

from ..frequency import block_names, capture_hidden, cosine, lowpass, split_tokens


@torch.no_grad()
def layerwise_similarity(bb, x_t: torch.Tensor, t: float, contexts, prompt: str, sigma: float = 1.0) -> dict:
    """Cosine similarity of each block's LF and HF image-token parts to the last block's (Fig. 5a): the mean per
    block (lf, hf) and per block and sample (lf_cases, hf_cases: blocks × N)."""
    h, w = x_t.shape[-2] // 2, x_t.shape[-1] // 2
    with capture_hidden(bb.transformer, n_target=h * w) as store:
        bb(x_t, t, contexts, prompt=prompt)
    names = block_names(bb.transformer)
    parts = {n: split_tokens(store[n][-1], h, w, sigma) for n in names}
    lf_last, hf_last = parts[names[-1]]
    lf = [cosine(parts[n][0], lf_last).tolist() for n in names]
    hf = [cosine(parts[n][1], hf_last).tolist() for n in names]
    return dict(
        blocks=names, lf=[float(np.mean(v)) for v in lf], hf=[float(np.mean(v)) for v in hf], lf_cases=lf, hf_cases=hf
    )


def first_depth(curves: np.ndarray, thr: float) -> np.ndarray:
    """Per sample: the depth fraction (block i of L -> (i + 1) / L) of the first block whose similarity to the
    last reaches thr. curves: (blocks, N) -> (N,)."""
    c = np.asarray(curves) >= thr
    return (np.argmax(c, axis=0) + 1) / c.shape[0]


@torch.no_grad()
def triplet_latents(bb, trips) -> dict[str, torch.Tensor]:
    """Normalised latents (N, 16, h, w) of HRGT, HRRI and the bicubic-upsampled LRGI of each triplet."""
    stack = lambda xs: torch.cat([bb.encode(x[None]).cpu().float() for x in xs])  # noqa: E731
    return dict(
        hrgt=stack([t.target for t in trips]),
        hrri=stack([t.reference for t in trips]),
        lrgi=stack([t.draft for t in trips]),
    )


def closeness(z: dict[str, torch.Tensor], sigma: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-triplet cosine similarity to HRGT of LRGI and HRRI latents, on full latents and on LF only (Fig. 5b, c)."""
    lf = {k: lowpass(v, sigma) for k, v in z.items()}
    return dict(
        lrgi=cosine(z["lrgi"], z["hrgt"]),
        hrri=cosine(z["hrri"], z["hrgt"]),
        lrgi_lf=cosine(lf["lrgi"], lf["hrgt"]),
        hrri_lf=cosine(lf["hrri"], lf["hrgt"]),
    )
