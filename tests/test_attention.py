import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from labkit import attention as AT
from labkit.experiments import attention_correspondence as XA


class NaiveProcessor(FluxAttnProcessor):
    """Reference: materialise the full joint-attention probabilities (B, H, N, N) of every block."""

    def __init__(self, store, name):
        super().__init__()
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim))), attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        if attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        self.store[self.name] = torch.softmax(
            q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / q.shape[-1] ** 0.5, -1
        )
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def _setup(tiny):
    g = torch.Generator().manual_seed(0)
    x, c1, c2 = (torch.randn(2, 16, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:40, 8:40] = 1
    q_target = AT.tokens_in_mask(mask, 16)  # target tokens come first among image tokens
    q_draft = AT.tokens_in_mask(mask, 16, offset=16)  # context-1 tokens
    spec = AT.CaptureSpec(queries={"target": q_target, "draft": q_draft}, ref=slice(32, 48), chunk=3)
    return x, [c1, c2], spec


@pytest.mark.parametrize("renorm", [True, False])
def test_streaming_equals_naive(tiny, renorm):
    x, ctx, spec = _setup(tiny)
    spec.renorm = renorm
    with AT.capture(tiny.transformer, spec, n_image=48) as rec:
        out = tiny(x, 0.7, ctx)
    store = {}
    original = dict(tiny.transformer.attn_processors)
    tiny.transformer.set_attn_processor({n: NaiveProcessor(store, AT.block_of(n)) for n in original})
    try:
        ref_out = tiny(x, 0.7, ctx)
    finally:
        tiny.transformer.set_attn_processor(original)
    assert torch.allclose(out, ref_out, atol=1e-5)  # capture does not change the model's output
    n_text = tiny.encode_prompt("reconstruct")[0].shape[1]
    for blk, p in store.items():
        for qname, idx in spec.queries.items():
            rows = p[:, :, n_text + idx][..., n_text + 32 : n_text + 48]
            if renorm:
                rows = rows / rows.sum(-1, keepdim=True)
            naive = rows.mean(1).sum(1)
            assert torch.allclose(rec.maps[(qname, 0.7, blk)], naive, atol=1e-5), (qname, blk)


def test_processors_restored_and_memory_independent_of_heads(tiny):
    x, ctx, spec = _setup(tiny)
    before = {n: type(p) for n, p in tiny.transformer.attn_processors.items()}
    plain = tiny(x, 0.7, ctx)
    with AT.capture(tiny.transformer, spec, n_image=48) as rec:
        captured = tiny(x, 0.7, ctx)
        tiny(x, 0.3, ctx)
    assert torch.allclose(captured, plain, atol=1e-5)  # capturing does not change what the model computes
    assert {n: type(p) for n, p in tiny.transformer.attn_processors.items()} == before
    assert torch.equal(tiny(x, 0.7, ctx), plain)  # and the default processors are back
    # what is kept is one (B, N_ref) row per (query set, t, block): no head or query dimension
    assert {k[1] for k in rec.maps} == {0.7, 0.3} and {k[2] for k in rec.maps} == {AT.block_of(n) for n in before}
    assert rec.stored_numel() == sum(v.numel() for v in rec.maps.values()) and all(
        v.shape == (2, 16) for v in rec.maps.values()
    )


def test_postprocessing_and_iou():
    grid = np.zeros((8, 8))
    grid[2:4, 3:6] = 1.0
    grid[7, 7] = 0.9  # a smaller, separate component is dropped
    comp, box = AT.map_to_box(grid, thr=0.5, patch=16)
    assert box == (48, 32, 96, 64) and comp.sum() == 6
    assert AT.box_iou(box, box) == 1.0 and AT.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    rng = np.random.default_rng(0)
    assert 0 < XA.chance_box_iou(box, box, 128, rng) < 0.5


def test_crop_reference_returns_the_box_content_upsampled():
    """Align→Focus: the crop holds exactly the (grown) box of the reference, at the working resolution."""
    from labkit.images import resize

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    ref = torch.stack([yy, xx, (yy * xx)])  # every pixel different: a crop of the wrong place cannot match
    out = AT.crop_reference(ref, (32, 40, 64, 88), margin=0.0, out_size=128)
    assert out.shape[-2] % 16 == 0 and out.shape[-1] % 16 == 0 and out.shape[-2] * out.shape[-1] >= 0.8 * 128 * 128
    assert abs(out.shape[-2] / out.shape[-1] - 48 / 32) < 0.15  # aspect of the box kept
    back = resize(out, (48, 32))
    assert (back - ref[:, 40:88, 32:64]).abs().mean() < 0.01
    assert (back - ref[:, 0:48, 0:32]).abs().mean() > 0.1
