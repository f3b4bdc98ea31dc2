"""Align as a warp (labkit.align), the region encodings, the refine task's examples and benchmark v2."""

import numpy as np
import pytest
import torch

from labkit import align as A
from labkit import data as D
from labkit import focus as F_
from labkit import images as IM
from labkit import inference as I
from labkit import pretrain as PT


def _photo(size=128):
    img = D.load_photo("coffee")  # test split: a textured photo
    return IM.to_tensor(IM.resize_np(img[:384, 100:484], size))


def _homography(deg=6.0, scale=1.05, shift=(4.0, -3.0), persp=(2e-4, -1e-4), c=64.0):
    th = np.deg2rad(deg)
    rot = np.array(
        [[scale * np.cos(th), -scale * np.sin(th), 0], [scale * np.sin(th), scale * np.cos(th), 0], [0, 0, 1.0]]
    )
    p = np.eye(3)
    p[2, :2] = persp
    to_c, back = (
        np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1.0]]),
        np.array([[1, 0, c + shift[0]], [0, 1, c + shift[1]], [0, 0, 1.0]]),
    )
    return back @ p @ rot @ to_c


def test_a_known_synthetic_warp_is_recovered_to_under_one_pixel():
    target = _photo()
    h_true = _homography()  # reference pixel -> draft pixel
    reference = A.warp_reference(target, np.linalg.inv(h_true), (128, 128))  # the scene seen through the inverse
    reference = (reference**1.1 * 0.95).clamp(0, 1)  # another light
    mask = torch.zeros(1, 128, 128)
    mask[:, 50:80, 40:90] = 1
    draft = target.clone()
    draft[:, 50:80, 40:90] = 0.5  # the region is wrong in the draft: registration must not rely on it
    reg = A.register(draft, mask, reference)
    assert reg.ok, reg.describe()
    pts = np.array([[x, y, 1.0] for x in (16, 64, 112) for y in (16, 64, 112)])
    est, true = pts @ reg.matrix.T, pts @ h_true.T
    err = np.abs(est[:, :2] / est[:, 2:] - true[:, :2] / true[:, 2:]).max()
    assert err < 1.0, f"max corner/centre error {err:.2f} px"
    warped = A.warp_reference(reference, reg.matrix, (128, 128))
    inside = torch.ones(128, 128, dtype=torch.bool)
    inside[40:90, 30:100] = False
    gain = torch.as_tensor(reg.gain, dtype=torch.float32)[:, None]
    off = torch.as_tensor(reg.offset, dtype=torch.float32)[:, None]
    assert ((gain * warped[:, inside] + off - target[:, inside]).abs().mean()) < 0.03  # lined up and light matched


def _registered_case(gamma=1.1, gain=0.95):
    """A target, the draft with its region greyed out, and the reference in another view and light."""
    target = _photo()
    h_true = _homography()
    reference = (A.warp_reference(target, np.linalg.inv(h_true), (128, 128)) ** gamma * gain).clamp(0, 1)
    mask = torch.zeros(1, 128, 128)
    mask[:, 50:80, 40:90] = 1
    draft = target.clone()
    draft[:, 50:80, 40:90] = 0.5
    return target, draft, mask, reference


def test_relit_reference_matches_the_draft_light_inside_the_region():
    target, draft, mask, reference = _registered_case(gamma=1.0, gain=0.8)
    reg = A.register(draft, mask, reference)
    assert reg.ok, reg.describe()
    m = mask[0].bool()
    plain = A.warp_reference(reference, reg.matrix, (128, 128))[:, m]
    relit = A.relit_reference(reference, reg, (128, 128))[:, m]
    err_plain, err_relit = (plain - target[:, m]).abs().mean(), (relit - target[:, m]).abs().mean()
    assert err_relit < 0.5 * err_plain, (err_relit, err_plain)  # the light fitted outside the region holds inside
    assert float(err_relit) < 0.03


def test_a_gamma_change_of_light_is_matched_by_the_tone_curve_better_than_by_a_gain():
    from dataclasses import replace

    target, draft, mask, reference = _registered_case(gamma=1.25, gain=0.9)
    reg = A.register(draft, mask, reference)
    assert reg.ok and reg.tone is not None and reg.describe()["tone"], reg.describe()
    m = mask[0].bool()
    err = lambda r: float((A.relit_reference(reference, r, (128, 128))[:, m] - target[:, m]).abs().mean())  # noqa: E731
    assert err(reg) < 0.7 * err(replace(reg, tone=None)), (err(reg), err(replace(reg, tone=None)))


def test_the_tone_curve_continues_with_the_gain_beyond_the_values_it_was_fitted_on():
    x = torch.linspace(0.2, 0.6, 64).repeat(3, 1, 1)  # (3, 1, 64): the values seen
    coef, rng = A.fit_tone(x, x**1.5, np.ones((1, 64), bool))
    assert np.allclose(rng, [[0.2, 0.6]] * 3, atol=1e-6)
    y = A.apply_tone(torch.tensor([0.4, 0.9, 0.05]).repeat(3, 1, 1), coef, rng, np.full(3, 0.5))[0, 0]
    assert abs(float(y[0]) - 0.4**1.5) < 1e-3  # inside: the curve
    assert abs(float(y[1]) - (0.6**1.5 + 0.5 * 0.3)) < 1e-3  # above: its end plus the gain's slope, not a cubic
    assert abs(float(y[2]) - (0.2**1.5 - 0.5 * 0.15)) < 1e-3
    assert A.fit_tone(x, x, np.zeros((1, 64), bool)) is None  # too few pixels: the gain/offset stays


@pytest.mark.parametrize("relight", [False, True])
def test_detail_adds_back_what_the_vae_loses_of_the_aligned_reference(relight):
    """refine(vae_detail=True) = the detail-free output + (a − VAE(a)) in the crop, pasted with the same soft mask:
    with the target as the (aligned) reference, the region gets closer to it."""
    target, draft, mask, _ = _registered_case()
    kw = dict(method="align", preset="mini", steps=2, seed=0, blend=True, relight=relight, accept=False)
    plain, info = I.refine_tensor(draft, mask, target, vae_detail=False, **kw)
    rich, info2 = I.refine_tensor(draft, mask, target, vae_detail=True, **kw)
    assert info["registration"]["used"] == "warp" and info2["relight"] is relight
    m = mask[0].bool()
    x0, y0, x1, y1 = info2["box"]
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert (rich - draft).abs()[:, outside].max() == 0  # every pixel outside the focus box kept
    err = lambda x: float((x[:, m] - target[:, m]).pow(2).mean())  # noqa: E731
    assert err(rich) < 0.7 * err(plain), (err(rich), err(plain))
    old, _ = I.refine_tensor(draft, mask, target, detail=False, **kw)  # the switch's old name still works
    assert torch.equal(old, plain)


def test_a_registration_without_texture_fails_and_refine_falls_back_to_the_box():
    flat = torch.full((3, 64, 64), 0.4)
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:40, 20:40] = 1
    reg = A.register(flat, mask, flat.clone())
    assert not reg.ok and "inliers" in reg.reason
    out, info = I.refine_tensor(flat, mask, flat.clone(), method="align", preset="tiny", steps=1)
    assert info["registration"]["used"] == "box" and "reference_box" in info and out.shape == flat.shape
    out, info = I.refine_tensor(flat, mask, flat.clone(), method="paste_warp", preset="tiny", steps=1)
    assert info["registration"]["used"] == "box" and "reference_box" in info  # the registered paste fell back too


def test_a_fit_that_leaves_the_reference_beside_the_draft_is_refused(monkeypatch):
    """A homography under which the reference covers (almost) nothing outside the region has no residual to check
    (0 over an empty overlap): register refuses it by its coverage and says so."""
    target, draft, mask, reference = _registered_case()
    away = np.array([[1.0, 0, 500], [0, 1, 0], [0, 0, 1]])  # the reference 500 px to the right of the draft
    outside = np.ones((128, 128), bool)
    assert A.coverage(np.eye(3), outside, (128, 128)) == 1.0 and A.coverage(away, outside, (128, 128)) == 0.0
    monkeypatch.setattr(A, "refine_fit", lambda *a, **k: (away, 0.0, np.ones(3), np.zeros(3)))
    reg = A.register(draft, mask, reference)
    assert not reg.ok and "covers 0%" in reg.reason, reg.describe()


def test_region_encodings_are_images_of_the_region():
    draft = torch.rand(3, 32, 32)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:16, 8:20] = 1
    ref = torch.rand(3, 32, 32)
    assert F_.region_contexts(draft, mask, [ref], "none") == [draft, ref]
    d, r, rf = F_.region_contexts(draft, mask, [ref], "context")
    assert d is draft and rf is ref and r.shape == (3, 32, 32) and r.sum() == 3 * 8 * 12
    drawn, _ = F_.region_contexts(draft, mask, [ref], "draw")
    changed = (drawn != draft).any(0)
    assert changed.any() and not changed[mask[0] > 0].any()  # the outline is drawn outside the region only
    assert not changed[:4].any()  # and only near it
    with pytest.raises(ValueError, match="unknown region encoding"):
        F_.region_contexts(draft, mask, [ref], "paint")


def test_refine_checks_the_new_inputs():
    c = D.make_triplet(0, "test", 64, 1, failure="smear")
    with pytest.raises(ValueError, match="mask size"):
        I.refine_tensor(c.draft, torch.ones(32, 32), c.reference, preset="tiny", steps=1)
    with pytest.raises(ValueError, match="at least 16x16"):
        I.refine_tensor(c.draft, c.mask, torch.rand(3, 8, 8), method="focus", preset="tiny", steps=1)
    with pytest.raises(TypeError, match="mask must be a PIL.Image"):
        I.refine_tensor(c.draft, "region.png", c.reference, preset="tiny", steps=1)
    with pytest.raises(ValueError, match="unknown region encoding"):
        I.refine_tensor(c.draft, c.mask, c.reference, preset="tiny", steps=1, region="paint")


@pytest.mark.parametrize("kind", D.FAILURES)
def test_every_failure_changes_only_the_region(kind):
    rng = np.random.default_rng(0)
    img = IM.to_numpy(_photo(64))
    mask = np.zeros((64, 64), np.float32)
    mask[16:40, 20:44] = 1
    out = D.damage(rng, img, mask, kind)
    assert np.array_equal(out[mask == 0], img[mask == 0])
    assert np.abs(out[mask == 1] - img[mask == 1]).mean() > 1e-3, kind


def test_refine_examples_are_built_as_refine_feeds_the_editor():
    cfg = PT.EditorConfig(misalign=0.0)
    e = PT.refine_example(np.random.default_rng(1), "train", cfg, kind="occlude")
    h, w = e["draft"].shape[-2:]
    assert h % 16 == 0 and w % 16 == 0 and abs(h * w - 128 * 128) / (128 * 128) < 0.2  # snapped to the working area
    assert e["mask"].shape == (1, h, w) and e["target"].shape == e["reference"].shape == (3, h, w)
    inside = e["mask"][0] > 0
    assert (e["draft"] - e["target"]).abs()[:, ~inside].mean() < 0.02  # outside the region the draft is the target
    assert (e["draft"] - e["target"]).abs()[:, inside].mean() > 0.02  # inside it is damaged


def test_training_fonts_and_held_out_fonts_are_disjoint():
    train, held = set(D._font_files("train")), set(D._font_files("test"))
    assert len(train) >= 20 and held and not train & held
    assert all("DejaVu" in f for f in held) and not any("DejaVu" in f for f in train)
    assert D._font_files("val") == D._font_files("test")


def test_benchmark_cases_sit_below_the_vae_ceiling(tiny):
    from labkit import evaluate as E

    cases = E.benchmark_cases(tiny, n_per_kind=1, kinds=("wrong", "smear"), size=64, room=-100)
    assert [c.meta["degradation"] for c in cases] == ["wrong", "smear"]
    assert all(c.meta["draft_psnr"] < c.meta["ceiling"] + 100 for c in cases)
    with pytest.raises(RuntimeError, match="below the VAE ceiling"):
        E.benchmark_cases(tiny, n_per_kind=1, kinds=("smear",), size=64, room=100, max_tries=2)


def test_paste_first_gives_the_editor_the_registered_paste_and_keeps_the_background(monkeypatch):
    """refine(paste_first=True): the editor's draft crop is the registered paste's; pixels outside the focus box
    stay the draft's; with the target as the reference the region ends closer to it than refining the draft."""
    target, draft, mask, _ = _registered_case()
    seen = []
    real_edit = I.edit
    monkeypatch.setattr(I, "edit", lambda r, img, *a, **k: seen.append(img) or real_edit(r, img, *a, **k))
    kw = dict(method="align", preset="mini", steps=2, seed=0, blend=True, relight=True, vae_detail=True, accept=False)
    plain, _ = I.refine_tensor(draft, mask, target, paste_first=False, **kw)
    first, info = I.refine_tensor(draft, mask, target, paste_first=True, **kw)
    assert info["registration"]["used"] == "warp" and info["paste_first"] is True
    x0, y0, x1, y1 = info["box"]
    reg = A.REGISTRATIONS(draft, mask, target, 0)
    pasted = IM.resize(F_.crop(A.registered_paste(draft, mask, target, reg), info["box"]), seen[1].shape[-2:])
    assert torch.allclose(seen[1], pasted) and not torch.allclose(seen[0], seen[1])  # the paste, not the draft
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert (first - draft).abs()[:, outside].max() == 0
    m = mask[0].bool()
    err = lambda x: float((x[:, m] - target[:, m]).pow(2).mean())  # noqa: E731
    assert err(first) < err(plain), (err(first), err(plain))


def test_residual_resamples_only_the_editors_change_to_the_paste():
    """refine(residual=True) with paste_first: the region ends closer to the target (the paste's detail does not go
    through the focus crop's up-and-down resize); without paste_first it has no effect and the info says so."""
    target, draft, mask, _ = _registered_case()
    kw = dict(method="align", preset="mini", steps=2, seed=0, blend=True, relight=True, vae_detail=True, accept=False)
    res, info = I.refine_tensor(draft, mask, target, paste_first=True, residual=True, **kw)
    plain, _ = I.refine_tensor(draft, mask, target, paste_first=True, residual=False, **kw)
    assert info["residual"] is True
    m = mask[0].bool()
    err = lambda x: float((x[:, m] - target[:, m]).pow(2).mean())  # noqa: E731
    assert err(res) < err(plain), (err(res), err(plain))
    a, info_a = I.refine_tensor(draft, mask, target, paste_first=False, residual=True, **kw)
    b, _ = I.refine_tensor(draft, mask, target, paste_first=False, residual=False, **kw)
    assert torch.equal(a, b) and info_a["residual"] is False


def test_a_non_planar_reference_changes_only_the_reference_and_defeats_the_planar_paste():
    flat, bent = (D.make_triplet(6, "test", 128, 1, failure="smear", view_strength=0.4, ref_deform=d) for d in (0, 3))
    for k in ("target", "draft", "mask"):
        assert torch.equal(getattr(flat, k), getattr(bent, k)), k  # the same case, only the reference differs
    assert (flat.reference - bent.reference).abs().mean() > 1e-3 and bent.meta["ref_deform"] == 3
    assert "ref_deform" not in flat.meta
    with pytest.raises(ValueError, match="ref_deform .* must be >= 0"):
        D.make_triplet(6, "test", 128, 1, failure="smear", ref_deform=-1)

    def paste_err(t):
        out, info = I.refine_tensor(t.draft, t.mask, t.reference, method="paste_warp", preset="tiny")
        assert info["registration"]["used"] == "warp"
        m = t.mask[0] > 0.5
        return float((out - t.target)[:, m].pow(2).mean())

    assert paste_err(bent) > 2 * paste_err(flat)  # a homography cannot undo a non-rigid change


def test_paste_first_examples_are_built_as_refine_builds_them():
    """The recipe's paste-first refine examples: the draft crop is the aligned reference soft-pasted into the region
    in the draft's light; outside the seam it is still the draft; with both options off the examples are unchanged."""
    base = PT.refine_example(np.random.default_rng(3), "train", PT.EditorConfig())
    first = PT.refine_example(np.random.default_rng(3), "train", PT.EditorConfig(paste_first=1.0))
    assert torch.equal(base["target"], first["target"]) and torch.equal(base["mask"], first["mask"])
    m = first["mask"][0] > 0.5
    assert (first["draft"] - first["reference"])[:, m].abs().mean() < 0.01  # the region is the pasted reference
    far = F_.soft_mask(first["mask"], dilate=25, blur_radius=3.0)[0] == 0  # the seam, upsampled with the crop
    assert torch.allclose(first["draft"][:, far], base["draft"][:, far], atol=1e-3)  # away from the seam: the draft
    lit_err = (first["reference"] - first["target"])[:, ~m].abs().mean()
    assert lit_err <= (base["reference"] - base["target"])[:, ~m].abs().mean() + 1e-6  # light matched to the draft


def test_registration_works_inside_no_grad_and_inference_mode():
    """A notebook that wraps refine in torch.no_grad / inference_mode still registers (the fit needs autograd)."""
    _, draft, mask, reference = _registered_case()
    plain = A.register(draft, mask, reference)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            reg = A.register(draft, mask, reference)
        assert reg.ok and np.allclose(reg.matrix, plain.matrix, atol=1e-6), reg.describe()
