import torch

from labkit import frequency as Fq
from labkit.experiments import latent_frequency as XF


def test_split_is_exact_and_constant_is_lf():
    x = torch.randn(2, 16, 8, 8)
    lf, hf = Fq.split(x, 1.0)
    assert torch.equal(lf + hf, x) or torch.allclose(lf + hf, x, atol=1e-6)
    c = torch.full((1, 4, 8, 8), 3.0)
    assert torch.allclose(Fq.lowpass(c, 1.5), c, atol=1e-5)


def test_hf_of_ramp_is_near_zero():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (0.3 * xx + 0.1 * yy)[None, None]
    _, hf = Fq.split(ramp, 1.0)
    assert hf[..., 3:-3, 3:-3].abs().max() < 1e-4  # away from the reflect-padded border


def test_radial_spectrum_separates_smooth_from_noise():
    x = torch.randn(1, 3, 32, 32)
    s_noise, s_smooth = Fq.radial_spectrum(x), Fq.radial_spectrum(Fq.lowpass(x, 2.0))
    assert s_noise.shape == (16,)
    assert s_smooth[-4:].mean() < 0.05 * s_noise[-4:].mean()


def blurred_case(seed: int, lo: int = 20, hi: int = 44) -> tuple:
    """A smooth multi-scale target (3, 64, 64), the region [lo, hi)² (1, 64, 64), a draft whose region lost its
    detail (σ = 2), and the generator (for more draws)."""
    g = torch.Generator().manual_seed(seed)
    target = sum(Fq.lowpass(torch.randn(1, 3, 64, 64, generator=g), s) * s for s in (0.7, 1.5, 3.0, 6.0))[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, lo:hi, lo:hi] = 1
    return target, mask, torch.where(mask > 0, Fq.lowpass(target[None], 2.0)[0], target), g


def test_lowpass_witness_finds_the_drafts_blur_and_grows_with_a_misplaced_paste():
    target, mask, draft, g = blurred_case(0)
    right = Fq.lowpass_witness(draft, target, mask)
    assert right["sigma"] == 2.0 and right["gap"] < 1e-3 and right["fine_share"] < 0.1 and right["corr"] > 0.99
    gaps = [Fq.lowpass_witness(draft, torch.roll(target, k, dims=-1), mask)["gap"] for k in range(4)]
    assert gaps == sorted(gaps) and gaps[3] > 100 * gaps[0]  # the further off, the more it misses
    sharp = torch.where(mask > 0, torch.rand(3, 64, 64, generator=g), target)  # a redrawn region is no witness
    assert Fq.lowpass_witness(sharp, target, mask)["fine_share"] > 1
    flat = torch.where(mask > 0, torch.full_like(target, 0.5), target)  # a region redrawn flat: blurred, but unrelated
    assert Fq.lowpass_witness(flat, target, mask)["corr"] == 0.0


def test_witness_shift_recovers_a_known_offset_of_the_paste_from_a_blurred_draft():
    target, mask, draft, g = blurred_case(0)
    assert Fq.witness_shift(draft, target, mask) == dict(dx=0.0, dy=0.0, shift_gain=1.0)  # right: nothing to move
    for dx, dy in ((1.5, -1.0), (-2.5, 0.5)):
        off = Fq.translate(target[None], torch.tensor([dx]), torch.tensor([dy]))[0]  # the paste (dx, dy) px off
        w = Fq.witness_shift(draft, off, mask)
        assert (w["dx"], w["dy"]) == (-dx, -dy) and w["shift_gain"] > 50
        back = Fq.translate(off[None], torch.tensor([w["dx"]]), torch.tensor([w["dy"]]))[0]
        err = lambda x: Fq.region_energy((x - target)[None], mask[None])  # noqa: E731
        assert err(back) < err(off) / 4  # moved back (two bilinear half-px samplings blur it a little)
    assert Fq.witness_shift(draft, target, torch.zeros(1, 64, 64))["shift_gain"] == 1.0  # no region: no evidence


def test_witness_shift_ring_ratio_tells_a_displaced_surface_from_a_displaced_region():
    target, mask, draft, _ = blurred_case(1, 24, 40)
    ring = torch.zeros(1, 64, 64)
    ring[:, 18:46, 18:46] = 1 - mask[:, 18:46, 18:46]
    moved = Fq.translate(target[None], torch.tensor([2.0]), torch.tensor([0.0]))[0]  # the whole view 2 px off
    surface = Fq.witness_shift(draft, moved, mask, ring=ring)  # the surroundings moved with it: they allow the shift
    region = Fq.witness_shift(draft, torch.where(mask > 0, moved, target), mask, ring=ring)  # only the region moved
    assert surface["dx"] == -2.0 and region["dx"] <= -1.5 and min(surface["shift_gain"], region["shift_gain"]) > 3
    assert surface["ring_ratio"] < 0.1 and region["ring_ratio"] > 10  # the right ring refuses a shift it does not need
    assert Fq.witness_shift(draft, target, torch.zeros(1, 64, 64), ring=ring)["ring_ratio"] == 1.0


def test_capture_one_entry_per_block_and_hooks_removed(tiny):
    x = torch.randn(1, 16, 8, 8)
    ctx = torch.randn(1, 16, 8, 8)
    before = [len(b._forward_hooks) for b in tiny.transformer.transformer_blocks]
    with Fq.capture_hidden(tiny.transformer, n_target=16) as store:
        tiny(x, 0.5, [ctx])
    assert list(store) == Fq.block_names(tiny.transformer)
    d = tiny.transformer.inner_dim
    assert all(v[0].shape == (1, 16, d) for v in store.values())
    assert [len(b._forward_hooks) for b in tiny.transformer.transformer_blocks] == before
    # the target slice differs from the context slice: perturbing the context only must change it less
    # than perturbing the target at the first block
    with Fq.capture_hidden(tiny.transformer, n_target=16) as s2:
        tiny(x + 1, 0.5, [ctx])
    assert not torch.allclose(s2["transformer_blocks.0"][0], store["transformer_blocks.0"][0])


def test_layerwise_similarity_last_is_one(tiny):
    x = torch.randn(2, 16, 8, 8)
    r = XF.layerwise_similarity(tiny, x, 0.5, [x], "reconstruct")
    assert len(r["lf"]) == len(r["blocks"]) == 4
    assert abs(r["lf"][-1] - 1) < 1e-5 and abs(r["hf"][-1] - 1) < 1e-5
