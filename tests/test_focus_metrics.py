import math

import pytest
import torch

from labkit import focus, metrics


def _mask(h=64, w=64, box=(20, 24, 36, 40)):
    m = torch.zeros(1, h, w)
    m[:, box[1] : box[3], box[0] : box[2]] = 1
    return m


def test_focus_box_margin_and_clipping():
    m = _mask()
    assert focus.focus_box(m, margin=0, working_area=64 * 64) == (20, 24, 36, 40)
    # margin scales with s = sqrt(working_area / (W·H)): 64 px at 1024² on a 64² image is 4 px
    assert focus.focus_box(m, margin=64, working_area=1024**2) == (16, 20, 40, 44)
    corner = _mask(box=(0, 0, 5, 5))
    assert focus.focus_box(corner, margin=64, working_area=64 * 64) == (0, 0, 64, 64)


def test_empty_and_full_masks():
    with pytest.raises(ValueError, match="empty mask"):
        focus.focus_box(torch.zeros(1, 32, 32))
    assert focus.focus_box(torch.ones(1, 32, 32), margin=8, working_area=32 * 32) == (0, 0, 32, 32)


def test_snap_size_keeps_aspect_and_multiple():
    h, w = focus.snap_size(30, 60, 128 * 128, 16)
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 2) < 0.25 and abs(h * w - 128 * 128) / (128 * 128) < 0.15


def test_paste_back_background_bit_exact():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 64, 64, generator=g)
    m = _mask(box=(50, 40, 64, 64))  # touches the border
    c_img, c_mask, box = focus.focus_crop(img, m, working_area=64 * 64, margin=4)
    assert c_img.shape[-2] % 16 == 0 and c_img.shape[-1] % 16 == 0
    refined = torch.rand_like(c_img)
    out = focus.paste_back(img, refined, box, focus.soft_mask(focus.crop(m, box)))
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[box[1] : box[3], box[0] : box[2]] = False
    assert torch.equal(out[:, outside], img[:, outside])
    assert not torch.equal(out, img)


def test_residual_paste_back_returns_what_the_refiner_kept_without_resampling_loss():
    """paste_back(residual_of=box image): a refiner that returns its upsampled input gives back the box exactly
    (the plain paste-back blurs it through the up-and-down resize); a uniform change comes back as that change."""
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1  # texture: resampling loses it
    c_img, _, box = focus.focus_crop(img, _mask(), working_area=128 * 128, margin=4)  # upsampled ×~4
    base = focus.crop(img, box)
    plain = focus.crop(focus.paste_back(img, c_img, box), box)
    kept = focus.crop(focus.paste_back(img, c_img, box, residual_of=base), box)
    assert (kept - base).abs().max() < 1e-5 and (plain - base).abs().mean() > 0.02
    moved = focus.crop(focus.paste_back(img, c_img + 0.05, box, residual_of=base), box)
    assert torch.allclose(moved, (base + 0.05).clamp(0, 1), atol=1e-5)


def test_soft_mask_covers_and_is_smooth():
    m = _mask()
    s = focus.soft_mask(m, dilate=7, blur_radius=5.0)
    assert s.shape == m.shape and s.min() >= 0 and s.max() <= 1
    assert (s[m > 0] > 0.9).float().mean() > 0.9  # inside stays ~1 after dilation
    assert ((s > 0.01) & (s < 0.99)).sum() > 0  # a ramp exists


def test_metrics_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g) * 0.8 + 0.1
    assert metrics.mse(a, a).abs().max() == 0 and torch.allclose(metrics.ssim(a, a), torch.ones(2))
    sigma = 0.05
    noisy = a + sigma * torch.randn(a.shape, generator=g)
    expect = -10 * math.log10(sigma**2)
    assert abs(metrics.psnr(noisy, a).mean().item() - expect) < 0.3
    assert metrics.ssim(noisy, a).mean() < 0.99


def test_region_and_background_metrics():
    a = torch.rand(1, 3, 32, 32)
    b = a.clone()
    m = _mask(32, 32, (8, 8, 16, 16))[None]
    b[..., 8:16, 8:16] += 0.1
    draft = a.clone()
    draft[..., 8:16, 8:16] = 0.0  # a wrong region in the input; the output fixed it except for +0.1
    rep = metrics.case_row(b[0], a[0], m[0], draft=draft[0], box=(8, 8, 16, 16))
    assert rep["mse_bg"] == 0 and abs(rep["region_mse"] - 0.01) < 1e-6  # bg is vs the draft, region vs the target
    assert rep["bg_box_maxabs"] == 0.0 and rep["region_ssim"] < 1
    assert abs(rep["region_psnr"] - 20.0) < 1e-3 and rep["psnr"] > rep["region_psnr"]
    moved = metrics.case_row(b[0], a[0], m[0], draft=a[0] * 0.5, box=(8, 8, 16, 16))
    assert moved["mse_bg"] > 0.01 and moved["bg_box_maxabs"] > 0.1  # a changed background is seen


def test_hf_ratio_detects_blur():
    from labkit.frequency import lowpass

    x = torch.rand(1, 3, 32, 32)
    assert abs(metrics.hf_energy_ratio(x, x).item() - 1) < 1e-6
    assert metrics.hf_energy_ratio(lowpass(x, 1.5), x).item() < 0.3
    assert metrics.spectrum_distance(lowpass(x, 1.5), x).item() > metrics.spectrum_distance(x, x).item()


def test_seam_error_sees_the_band_and_only_the_band():
    """Zero for identical images over a non-empty ±4 px band; a change on the mask's edge counts, one far from it
    (the region's centre, outside the band) does not."""
    from labkit.losses import boundary_band

    m = _mask(48, 48, (8, 8, 40, 40))
    band = boundary_band(m[None].float(), 4)
    assert 0 < int(band.sum()) < 48 * 48 and band[0, 0, 8, 24] == 1 and band[0, 0, 24, 24] == 0
    a = torch.rand(1, 3, 48, 48)
    assert focus.seam_error(a, a, m).item() == 0
    edge, centre = a.clone(), a.clone()
    edge[..., 6:10, 20:28] += 0.5  # across the top edge of the region
    centre[..., 22:26, 22:26] += 0.5  # deep inside the region, > 4 px from its edge
    assert focus.seam_error(edge, a, m).item() > 1e-3 and focus.seam_error(centre, a, m).item() == 0


def test_feature_similarity_from_local_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    sim = metrics.FeatureSimilarity(str(tmp_path / "clip"))
    assert sim.kind == "clip" and sim.size == 32
    a = torch.rand(2, 3, 64, 64)
    s = sim(a, a)
    assert s.shape == (2,) and torch.allclose(s, torch.ones(2), atol=1e-5)
    assert sim(a, 1 - a).mean() < 1.0
    with pytest.raises(FileNotFoundError, match="no local model folder"):
        metrics.FeatureSimilarity(str(tmp_path / "nope"))
