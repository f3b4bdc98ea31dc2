"""Benchmark v3's cases (labkit.objects), the registration of an object photographed on its own (the ring, the
non-rigid correction), and refine's do-no-harm check."""

import numpy as np
import pytest
import torch

from labkit import align as A
from labkit import data as D
from labkit import inference as I
from labkit import objects as O
from labkit import pretrain as PT
from labkit.metrics import region_psnr


def _ring_error(case, reg) -> float:
    """Mean distance (reference px) between the registration's and the true mapping on the ring around the region."""
    band = A.ring_of(case.mask)
    flow = None if reg.flow is None else torch.as_tensor(reg.flow)
    est = A.reference_coords(torch.as_tensor(reg.matrix), tuple(case.draft.shape[-2:]), flow).numpy()
    est = est.reshape(*band.shape, 2)[band]
    return float(np.nanmean(np.linalg.norm(est - O.true_reference_coords(case)[band], axis=1)))


def test_object_cases_share_no_background_and_damage_only_the_region():
    c = O.object_case(0, "test", failure="wrong", curved=True)
    assert c.meta["set"] == "object" and c.meta["curved"] and 0.6 <= c.meta["bend"] <= 0.9
    outside = c.mask[0] < 0.5
    assert torch.equal(c.draft[:, outside], c.target[:, outside]) and not torch.equal(c.draft, c.target)
    corner = c.reference[:, :6, :6].reshape(3, -1)  # the product shot's backdrop: smooth, unlike the scene
    assert float(corner.std(1).max()) < 0.05
    again = O.object_case(0, "test", failure="wrong", curved=True)
    assert torch.equal(c.draft, again.draft) and torch.equal(c.reference, again.reference)  # deterministic


def test_the_true_mapping_lands_on_the_object():
    """Sampling the reference at the true coordinates reproduces the scene's object up to its light."""
    c = O.object_case(1, "val", failure="smear", kind="label")
    band = torch.from_numpy(A.ring_of(c.mask))
    xy = torch.from_numpy(O.true_reference_coords(c)).float()
    g = torch.stack([(xy[..., 0] + 0.5) / 128 * 2 - 1, (xy[..., 1] + 0.5) / 128 * 2 - 1], -1)[None]
    warped = torch.nn.functional.grid_sample(c.reference[None], g, align_corners=False)[0]
    w = band.float()[None]
    a, b = A._gain_offset(warped.double(), c.target.double(), w.double())
    err = ((a * warped + b - c.target) * w).abs().sum() / (3 * w.sum())
    assert float(err) < 0.03


def test_held_out_families_never_reach_train_or_val():
    assert O.family_of("test") == "held_out" and O.family_of("val") == O.family_of("train") == "seen"
    assert not set(O._fonts("test")) & set(O._fonts("train"))
    rng = np.random.default_rng(0)
    assert all(O._text_px(rng, "train") in range(14, 29) for _ in range(50))
    assert all(O._text_px(rng, "test") not in range(13, 40) for _ in range(50))


def test_a_known_homography_of_a_product_shot_is_recovered_to_under_a_pixel_on_the_ring():
    c = O.object_case(0, "val", failure="smear", kind="label")
    reg = A.register(c.draft, c.mask, c.reference)
    assert reg.ok and reg.scope == "object", reg.describe()  # no shared background: only the object registers it
    assert _ring_error(c, reg) < 1.0


def test_a_known_cylinder_bend_is_recovered_to_under_a_pixel_and_the_flow_is_what_gets_it_there():
    c = O.object_case(0, "val", failure="smear", curved=True, kind="label")
    rigid = A.register(c.draft, c.mask, c.reference, nonrigid=False)
    bent = A.register(c.draft, c.mask, c.reference)
    assert bent.ok and bent.flow is not None and bent.describe()["nonrigid"]
    assert _ring_error(c, bent) < 1.0 and _ring_error(c, bent) < 0.5 * _ring_error(c, rigid)


def test_the_scene_path_is_tried_first_and_kept_for_a_shared_background():
    t = D.make_triplet(3, "test", 128, 1, failure="wrong", view_strength=0.4)
    reg = A.register(t.draft, t.mask, t.reference)
    assert reg.ok and reg.scope == "scene" and reg.flow is None


def test_a_failed_object_registration_says_why():
    c = O.object_case(0, "val", failure="smear", kind="label")
    flat = torch.full_like(c.reference, 0.5)  # nothing to match
    reg = A.register(c.draft, c.mask, flat)
    assert not reg.ok and "RANSAC inliers" in reg.reason


def _blob(h=64):
    m = torch.zeros(1, h, h)
    m[:, 24:40, 24:40] = 1
    return m


def test_accept_check_keeps_the_paste_when_the_editor_leaves_the_aligned_reference(monkeypatch):
    monkeypatch.setattr(I, "ACCEPT_AGREE_DB", 30.0)  # the rule at a threshold that lets an editor through
    monkeypatch.setattr(I, "ACCEPT_DRAFT_MARGIN_DB", 101.0)  # the draft rule off: random images agree by chance
    draft, mask = torch.rand(3, 64, 64), _blob()
    aligned = torch.rand(3, 64, 64)
    paste = A.soft_paste(draft, mask, aligned)
    wild = paste.clone()
    wild[:, 20:44, 20:44] = 1 - wild[:, 20:44, 20:44]  # an editor that redraws the region as something else
    out, why = I.accept_check(wild, draft, mask, aligned, paste)
    assert why["kept"] == "paste" and torch.equal(out, paste)
    out, why = I.accept_check(paste, draft, mask, aligned, paste)  # an editor that keeps the right paste
    assert why["kept"] == "editor" and why["agree_db"] > I.ACCEPT_AGREE_DB


def test_accept_check_shifts_a_paste_a_few_px_off_to_a_blurred_draft_and_keeps_the_draft_beyond_reach():
    c = O.object_case(0, "val", failure="lowres4")  # the draft: the label's detail lost (×4)
    for k, kept in ((0, "paste"), (2, "shifted paste"), (5, "draft")):  # a registration k px off (a non-planar view)
        aligned = torch.roll(c.target, k, dims=-1)
        paste = A.soft_paste(c.draft, c.mask, aligned)
        out, why = I.accept_check(paste, c.draft, c.mask, aligned, paste)  # the editor returns the paste: not in play
        assert why["kept"] == kept and {"fine_share", "gap", "sigma", "shift_gain", "dx", "dy"} <= set(why)
        if kept == "paste":
            assert torch.equal(out, paste) and why["shift_gain"] == 1.0
        elif kept == "shifted paste":  # moved back onto the target: far above the paste and the draft
            assert (why["dx"], why["dy"]) == (k, 0.0) and why["shift_gain"] >= I.ACCEPT_SHIFT_GAIN
            assert why["ring_ratio"] <= I.ACCEPT_SHIFT_RING  # the whole view rolled: the ring moves with the region
            assert region_psnr(out, c.target, c.mask) > region_psnr(c.draft, c.target, c.mask) + 20
        else:  # beyond the shift's reach: the paste still misses the draft's low frequencies
            assert torch.equal(out, c.draft) and why["shifted_gap"] > I.ACCEPT_LOWPASS_GAP and "blurred" in why["why"]
            assert region_psnr(paste, c.target, c.mask) < region_psnr(c.draft, c.target, c.mask) - 3


def test_accept_check_without_a_registration_keeps_the_draft_when_the_seam_breaks(monkeypatch):
    monkeypatch.setattr(I, "ACCEPT_SEAM_DB", 30.0)
    draft, mask = torch.rand(3, 64, 64), _blob()
    broken = draft.clone()
    broken[:, 16:48, 16:48] = 0.0  # the edit spills over the region's surroundings
    out, why = I.accept_check(broken, draft, mask, None, None)
    assert why["kept"] == "draft" and torch.equal(out, draft) and why["registration"] is False
    inside = draft.clone()
    inside[:, 25:39, 25:39] = 0.0  # a change inside the region only
    assert I.accept_check(inside, draft, mask, None, None)[1]["kept"] == "editor"


def test_refine_with_accept_returns_a_candidate_and_says_which():
    c = O.object_case(0, "val", failure="wrong", kind="label")
    out, info = I.refine_tensor(c.draft, c.mask, c.reference, preset="tiny", steps=1)  # on by default (05's val)
    assert info["registration"]["scope"] == "object" and info["accept"]["kept"] in ("editor", "paste", "shifted paste")
    paste = I.refine_tensor(c.draft, c.mask, c.reference, method="paste_warp", preset="tiny")[0]
    if info["accept"]["kept"] == "paste":
        assert torch.allclose(out, paste, atol=1e-6)
    plain, info2 = I.refine_tensor(c.draft, c.mask, c.reference, preset="tiny", steps=1, accept=False)
    assert "accept" not in info2  # off: the editor's output as it is


@pytest.mark.parametrize("kind", ["identity", "unaligned", "objects"])
def test_the_refine_task_draws_the_new_kinds_of_example(kind):
    cfg = PT.EditorConfig(**{kind: 1.0})
    e = PT.refine_example(np.random.default_rng(0), "train", cfg, kind="wrong")
    if kind == "identity":
        assert e["kind"] == "identity" and torch.allclose(e["draft"], e["target"], atol=1e-5)
    elif kind == "unaligned":
        aligned = PT.refine_example(np.random.default_rng(0), "train", PT.EditorConfig(), kind="wrong")
        assert e["kind"] == "wrong+unaligned" and not torch.allclose(e["reference"], aligned["reference"], atol=0.05)
    else:
        assert e["content"] == "object" and e["reference"].shape == e["draft"].shape
