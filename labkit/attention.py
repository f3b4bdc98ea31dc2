"""Attention correspondence (Refine-by-Align): streaming capture of query -> reference-key attention
in every FLUX block, reduced as it is computed to M[t, l] = Σ_{q in mask} mean_heads A[q, ref keys].

Joint-sequence layout in both block types: [text | target (id 0) | context 1 | context 2 | ...].
Storage is O(T · L · N_ref) per query set, independent of heads and of the number of queries.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from scipy import ndimage

from .focus import snap_size
from .images import resize, resize_mask


@dataclass
class CaptureSpec:
    """Which queries and which keys to reduce. Indices are into the *image* token sequence (no text)."""

    queries: dict[str, torch.Tensor]  # name -> (Nq,) image-token indices (e.g. target tokens in the mask)
    ref: slice  # image-token slice of the reference keys
    renorm: bool = True  # renormalise the joint softmax over the reference keys (else: raw share of all keys)
    chunk: int = 256  # queries per chunk (bounds the transient (B, H, chunk, N) block)


@dataclass
class Recorder:
    """Accumulates M per (query set, timestep, block) as (B, N_ref) float32 tensors."""

    spec: CaptureSpec
    t: float = -1.0
    maps: dict[tuple[str, float, str], torch.Tensor] = field(default_factory=dict)

    def stored_numel(self) -> int:
        return sum(v.numel() for v in self.maps.values())


class CaptureProcessor(FluxAttnProcessor):
    """FluxAttnProcessor that also reduces query -> reference attention for the recorder's query sets."""

    def __init__(self, name: str, recorder: Recorder):
        super().__init__()
        self.name, self.rec = name, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))  # (B, N, H, d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        n_text = 0
        if attn.added_kv_proj_dim is not None:  # double-stream: text tokens come from the context stream
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            n_text = eq.shape[1]
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        else:  # single-stream: hidden_states is already [text | image]
            n_text = q.shape[1] - self.n_image
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        self._reduce(q, k, n_text)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask
        ).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            enc, img = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(enc.contiguous())
        return out

    @torch.no_grad()
    def _reduce(self, q: torch.Tensor, k: torch.Tensor, n_text: int) -> None:
        """For each query set: softmax over all keys, chunk by chunk; keep Σ_q mean_h A[q, ref] (B, N_ref)."""
        spec = self.rec.spec
        kt = k.transpose(1, 2).float()  # (B, H, N, d)
        ref = slice(n_text + spec.ref.start, n_text + spec.ref.stop)
        scale = 1.0 / math.sqrt(q.shape[-1])
        for qname, idx in spec.queries.items():
            acc = torch.zeros(q.shape[0], ref.stop - ref.start)
            for part in idx.split(spec.chunk):
                qs = q[:, n_text + part.to(q.device)].transpose(1, 2).float()  # (B, H, c, d)
                p = torch.softmax(qs @ kt.transpose(-1, -2) * scale, dim=-1)[..., ref]  # (B, H, c, N_ref)
                if spec.renorm:
                    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
                acc += p.mean(1).sum(1).cpu()
            key = (qname, round(self.rec.t, 4), self.name)
            self.rec.maps[key] = self.rec.maps.get(key, 0) + acc


@contextlib.contextmanager
def capture(transformer, spec: CaptureSpec, n_image: int, blocks: list[str] | None = None) -> Iterator[Recorder]:
    """Install capture processors (set_attn_processor) on the chosen blocks; restore the originals on exit.

    n_image: the number of image tokens (target + contexts) in the sequence. The timestep is read from
    the transformer's `timestep` argument (t in [0, 1]) by a forward pre-hook."""
    rec = Recorder(spec)
    original = dict(transformer.attn_processors)
    procs = {}
    for name, proc in original.items():
        blk = block_of(name)
        if blocks is None or blk in blocks:
            p = CaptureProcessor(blk, rec)
            p.n_image = n_image
            procs[name] = p
        else:
            procs[name] = proc

    def pre_hook(module, args, kwargs):
        ts = kwargs.get("timestep")
        rec.t = float(ts.flatten()[0]) if ts is not None else -1.0

    transformer.set_attn_processor(procs)
    h = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield rec
    finally:
        h.remove()
        transformer.set_attn_processor(original)


def block_of(processor_name: str) -> str:
    """'transformer_blocks.3.attn.processor' -> 'transformer_blocks.3' (the one spelling of a block name)."""
    parts = processor_name.split(".")
    return f"{parts[0]}.{parts[1]}"


def tokens_in_mask(mask: torch.Tensor, patch: int, offset: int = 0, thr: float = 0.5) -> torch.Tensor:
    """Indices of the packed tokens (patch×patch pixels each) whose area is ≥ thr inside mask (1, H, W)."""
    m = torch.nn.functional.avg_pool2d(mask.float()[None], patch)[0, 0]  # (H/p, W/p)
    idx = torch.nonzero(m.flatten() >= thr).flatten()
    if len(idx) == 0:  # a region smaller than a token: take the token with the largest coverage
        idx = m.flatten().argmax()[None]
    return idx + offset


# ------------------------------------------------------------------------------------------------
# post-processing and scoring
def to_grid(m: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(N_ref,) map -> (h, w) numpy normalised to [0, 1]."""
    g = m.reshape(hw).float().numpy()
    g = g - g.min()
    return g / (g.max() + 1e-12)


def map_to_box(grid: np.ndarray, thr: float = 0.5, patch: int = 16) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Threshold a normalised map, keep the largest component; return its mask and pixel bbox (x0, y0, x1, y1)."""
    lab, n = ndimage.label(grid >= thr)
    if n == 0:
        lab, n = ndimage.label(grid >= grid.max())
    sizes = ndimage.sum(np.ones_like(grid), lab, range(1, n + 1))
    comp = lab == (int(np.argmax(sizes)) + 1)
    ys, xs = np.nonzero(comp)
    return comp, (
        int(xs.min()) * patch,
        int(ys.min()) * patch,
        (int(xs.max()) + 1) * patch,
        (int(ys.max()) + 1) * patch,
    )


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def crop_reference(
    reference: torch.Tensor, box, margin: float = 0.25, out_size: int | None = None, multiple: int = 16
) -> torch.Tensor:
    """Align→Focus: crop the reference around M*'s box (grown by margin × side) and upsample it, so the
    reference region also gets the resolution budget before it becomes a context."""
    h, w = reference.shape[-2:]
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    b = (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(w, int(math.ceil(x1 + mx))), min(h, int(math.ceil(y1 + my))))
    c = reference[..., b[1] : b[3], b[0] : b[2]]
    area = (out_size or h) * (out_size or w)
    return resize(c, snap_size(c.shape[-2], c.shape[-1], area, multiple))


# ------------------------------------------------------------------------------------------------
# one triplet: contexts = [LRGI upsampled (id 1), HRRI (id 2)]; queries = target / draft tokens in the mask


def score(maps: dict, trip, hw: tuple[int, int], thr: float = 0.5, patch: int = 16) -> dict:
    """Box IoU and mask IoU (token grid) of each map's largest thresholded component vs the true region."""
    gt_tok = torch.nn.functional.avg_pool2d(trip.ref_mask[None].float(), patch)[0, 0].numpy() >= 0.5
    out = {}
    for key, m in maps.items():
        comp, box = map_to_box(to_grid(m, hw), thr, patch)
        out[key] = dict(box_iou=box_iou(box, trip.ref_bbox), mask_iou=mask_iou(comp, gt_tok), box=box)
    return out


# ------------------------------------------------------------------------------------------------
# Refine-by-Align's M* for one draft and reference, and the box it locates
@torch.no_grad()
def correspondence(
    r, draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, timesteps=(0.75, 0.5, 0.25), seed: int = 0
) -> np.ndarray:
    """Refine-by-Align's M*: attention of the draft's in-mask queries to the reference's keys, averaged over
    timesteps and every block: (h, w) on the reference's token grid (h = H_ref // multiple), scaled to [0, 1].
    r: an editor.Refiner (its backbone and instruction)."""
    bb, p = r.bb, r.bb.multiple
    hw = (max(p, draft.shape[-2] // p * p), max(p, draft.shape[-1] // p * p))  # the draft snapped as focus snaps it
    if hw != tuple(draft.shape[-2:]):
        draft, mask = resize(draft, hw), resize_mask(mask, hw)
    ref = resize(reference, (reference.shape[-2] // p * p or p, reference.shape[-1] // p * p or p))
    z_d, z_r = bb.encode(draft[None]), bb.encode(ref[None])
    span = bb.token_spans([z_d.shape[-2:], z_d.shape[-2:], z_r.shape[-2:]], ("target", "draft", "reference"))
    spec = CaptureSpec(queries={"draft": tokens_in_mask(mask, p, offset=span["draft"].start)}, ref=span["reference"])
    g = torch.Generator().manual_seed(seed)
    with capture(bb.transformer, spec, n_image=span["reference"].stop) as rec:
        for t in timesteps:  # the draft noised to t stands in for the unknown target (SDEdit-style)
            eps = torch.randn(z_d.shape, generator=g)
            bb((1 - t) * z_d + t * eps, float(t), [z_d, z_r], prompt=r.prompt)
    m = torch.stack([v[0] / v[0].sum() for v in rec.maps.values()]).mean(0)
    return to_grid(m, (ref.shape[-2] // p, ref.shape[-1] // p))


def locate(
    r, draft: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, timesteps=(0.75, 0.5, 0.25), seed: int = 0
) -> tuple[int, int, int, int]:
    """Refine-by-Align: the box of M*'s largest component (threshold 0.5) in the reference's pixels (the average
    over timesteps and blocks beat any single (t, l) on mini, 01_attention_correspondence)."""
    p = r.bb.multiple
    _, box = map_to_box(correspondence(r, draft, mask, reference, timesteps, seed), 0.5, p)
    sy = reference.shape[-2] / (reference.shape[-2] // p * p or p)
    sx = reference.shape[-1] / (reference.shape[-1] // p * p or p)  # back to the reference's pixels
    return int(box[0] * sx), int(box[1] * sy), int(round(box[2] * sx)), int(round(box[3] * sy))
