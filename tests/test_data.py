import numpy as np
import pytest
import torch

from labkit import data as D
from labkit import images as IM


def test_triplet_deterministic_per_seed():
    a, b, c = D.make_triplet(3, "train"), D.make_triplet(3, "train"), D.make_triplet(4, "train")
    for k in ("target", "reference", "lowres", "mask", "ref_mask", "scribble"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert not torch.equal(a.target, c.target)


@pytest.mark.parametrize("seed", range(6))
def test_triplet_geometry(seed):
    t = D.make_triplet(seed, "test", size=128, factor=4)
    assert t.target.shape == t.reference.shape == (3, 128, 128) and t.lowres.shape == (3, 32, 32)
    x0, y0, x1, y1 = t.bbox
    m = t.mask[0]
    assert m.sum() > 0 and m[:, :x0].sum() == 0 and m[:, x1:].sum() == 0 and m[:y0].sum() == 0 and m[y1:].sum() == 0
    assert (t.scribble <= t.mask).all() and t.scribble.sum() > 0
    # the warp maps the HRGT region onto the HRRI region: warp the mask's pixels and compare with ref_mask
    ys, xs = np.nonzero(m.numpy() > 0.5)
    p = t.warp @ np.stack([xs, ys, np.ones_like(xs)]).astype(float)
    px, py = np.round(p[0] / p[2]).astype(int), np.round(p[1] / p[2]).astype(int)
    ok = (px >= 0) & (px < 128) & (py >= 0) & (py < 128)
    assert ok.mean() > 0.85
    assert t.ref_mask[0].numpy()[py[ok], px[ok]].mean() > 0.9
    # the reference shows the same content there: HRGT pixels vs HRRI at warped positions correlate
    a = t.target.numpy()[:, ys[ok], xs[ok]].ravel()
    b = t.reference.numpy()[:, py[ok], px[ok]].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.5


def test_artifacts_only_inside_mask():
    t = D.make_triplet(11, "val", size=128, factor=2, degradation="noise")
    low = IM.resize(t.target, 64)
    m_low = IM.resize(t.mask, 64, "bilinear")  # the blend mask the generator uses
    diff = (t.lowres - low).abs().sum(0)
    assert diff[m_low[0] == 0].max() < 1e-5 and diff[m_low[0] > 0.5].mean() > 0.02


def test_splits_are_by_source():
    names = {s: {n for _, n in D.sources(s, "photo")} for s in D.SPLITS}
    assert not (names["train"] & names["test"]) and not (names["train"] & names["val"])
    t = D.make_triplet(0, "test", content="photo")
    assert t.meta["source"] in names["test"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty mask"):
        IM.bbox_of(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        D.make_triplet(0, size=100, factor=3)
    with pytest.raises(ValueError, match="split"):
        D.sources("training")
    with pytest.raises(ValueError, match="unknown degradation"):
        D.degrade(np.random.default_rng(0), np.zeros((8, 8, 3), np.float32), "jpeg")


def test_eval_set_cached_and_fixed(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "CACHE_DIR", tmp_path)
    a = D.eval_set(n=2, degradations=("blur", "color"), size=64, extra_refs=1)
    folders = list(tmp_path.glob("eval_*"))
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {
        "pixels.safetensors",
        "cases.json",
    }  # no pickles
    b = D.eval_set(n=2, degradations=("blur", "color"), size=64, extra_refs=1)  # from the cache
    fresh = D.eval_set(n=2, degradations=("blur", "color"), size=64, extra_refs=1, cache=False)
    assert len(a) == 4
    for x, y in zip(b, fresh):  # the cache round-trips every field
        assert all(torch.equal(getattr(x, k), getattr(y, k)) for k in D.TENSORS) and torch.equal(
            x.extra_refs[0], y.extra_refs[0]
        )
        assert x.bbox == y.bbox and x.ref_bbox == y.ref_bbox and x.meta == y.meta and np.allclose(x.warp, y.warp)
    assert {t.meta["split"] for t in a} == {"test"}


def test_rendered_sources_have_detail():
    for img in (D.render_text("test", 0), D.render_logo("test", 0)):
        assert img.shape == (384, 384, 3) and img.std() > 0.05
