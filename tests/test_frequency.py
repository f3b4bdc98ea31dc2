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


def test_lowpass_witness_finds_the_drafts_blur_and_grows_with_a_misplaced_paste():
    g = torch.Generator().manual_seed(0)
    target = sum(Fq.lowpass(torch.randn(1, 3, 64, 64, generator=g), s) * s for s in (0.7, 1.5, 3.0, 6.0))[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:44, 20:44] = 1
    draft = torch.where(mask > 0, Fq.lowpass(target[None], 2.0)[0], target)  # the region's detail lost (σ = 2)
    right = Fq.lowpass_witness(draft, target, mask)
    assert right["sigma"] == 2.0 and right["gap"] < 1e-3 and right["fine_share"] < 0.1 and right["corr"] > 0.99
    gaps = [Fq.lowpass_witness(draft, torch.roll(target, k, dims=-1), mask)["gap"] for k in range(4)]
    assert gaps == sorted(gaps) and gaps[3] > 100 * gaps[0]  # the further off, the more it misses
    sharp = torch.where(mask > 0, torch.rand(3, 64, 64, generator=g), target)  # a redrawn region is no witness
    assert Fq.lowpass_witness(sharp, target, mask)["fine_share"] > 1
    flat = torch.where(mask > 0, torch.full_like(target, 0.5), target)  # a region redrawn flat: blurred, but unrelated
    assert Fq.lowpass_witness(flat, target, mask)["corr"] == 0.0


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
