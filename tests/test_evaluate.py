"""labkit.refine (inference entry) and the evaluation tables."""

import numpy as np
import pytest
import torch
from PIL import Image

import labkit
from labkit import cases as CS
from labkit import data as D
from labkit import evaluate as E
from labkit import inference as I
from labkit.experiments import attention_correspondence as XA


@pytest.fixture(scope="module")
def case():
    return D.make_triplet(3, "test", 64, 2)


def _draft(c):
    return c.draft


def test_refine_rejects_bad_inputs(case):
    img = _draft(case)
    with pytest.raises(ValueError, match="does not match the image"):
        labkit.refine(img, torch.ones(32, 32), case.reference, preset="tiny")
    with pytest.raises(ValueError, match="empty mask"):
        labkit.refine(img, torch.zeros(64, 64), case.reference, preset="tiny")
    with pytest.raises(TypeError, match="reference must be a PIL.Image"):
        labkit.refine(img, case.mask, reference="ref.png", preset="tiny")
    with pytest.raises(ValueError, match="unknown method"):
        labkit.refine(img, case.mask, case.reference, method="magic", preset="tiny")
    with pytest.raises(ValueError, match="needs a reference"):
        labkit.refine(img, case.mask, None, method="align", preset="tiny")
    with pytest.raises(ValueError, match="multiples of 16"):
        labkit.refine(torch.rand(3, 60, 64), torch.ones(60, 64), case.reference, method="full", preset="tiny")
    with pytest.raises(FileNotFoundError, match="make figures NB=04_train_freqmole"):
        I.resolve_adapter("no-such-adapter")


@pytest.mark.parametrize("method", ["focus", "align", "full"])
def test_refine_returns_pil_of_input_size_from_pil_inputs(case, method):
    img = I.to_pil(_draft(case)).resize((80, 64)) if method != "full" else I.to_pil(_draft(case))
    mask = Image.fromarray((case.mask[0].numpy() * 255).astype(np.uint8)).resize(img.size)
    out = labkit.refine(img, mask, I.to_pil(case.reference), method=method, preset="tiny", steps=2)
    assert isinstance(out, Image.Image) and out.size == img.size


def test_reference_free_mode_and_background_exact_outside_the_box(case):
    img = _draft(case)
    out, info = I.refine_tensor(img, case.mask, None, method="focus", preset="tiny", steps=2)
    x0, y0, x1, y1 = info["box"]
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(out[:, outside], img[:, outside])  # bit-identical
    assert not torch.equal(out, img)  # and the region did change
    row = E.score(out, case, img, info["box"])
    assert row["bg_box_maxabs"] == 0.0


def test_locate_finds_the_region_in_the_reference_better_than_chance():
    """Refine-by-Align's M* on the trained mini editor: the located box overlaps the true region of the
    (rotated, rescaled) reference well above a random box of the same size, on held-out test triplets."""
    from labkit import attention as AT

    r, rng = I.load_refiner("mini"), np.random.default_rng(0)
    ious, chance = [], []
    for i in range(8):
        c = D.make_triplet(i, "test", 128, 2, degradation="blur")
        box = AT.locate(r, c.draft, c.mask, c.reference)
        ious.append(AT.box_iou(box, c.ref_bbox))
        chance.append(XA.chance_box_iou(box, c.ref_bbox, 128, rng))
    assert np.mean(ious) > 2 * np.mean(chance) and np.mean(ious) > 0.3


def test_naive_paste_moves_reference_content_into_the_mask(case):
    img = _draft(case)
    out, info = I.refine_tensor(img, case.mask, case.reference, method="paste", reference_box=case.ref_bbox)
    assert info["reference_box"] == case.ref_bbox
    far = torch.nn.functional.max_pool2d(case.mask[None], 31, 1, 15)[0, 0] == 0  # well away from the soft edge
    assert torch.equal(out[:, far], img[:, far]) and not torch.equal(out, img)


def test_table_shape_columns_best_and_cis():
    cases = D.eval_set(n=2, degradations=("blur", "glyph"), size=64, cache=False)
    methods = {
        "input": lambda c: I.refine_tensor(_draft(c), c.mask, method="input"),
        "paste": lambda c: I.refine_tensor(_draft(c), c.mask, c.reference, method="paste", reference_box=c.ref_bbox),
        "target": lambda c: (c.target.clone(), {}),
    }
    df, samples = E.run(cases, methods, _draft, progress=False)
    assert len(df) == 3 * 4 and set(df.method) == set(methods) and len(samples["input"]) == 4
    cols = [c for c in E.COLUMNS if c in df]
    assert cols == ["region_mse", "region_psnr", "region_ssim", "region_hf_err", "mse_bg", "ssim_bg", "psnr", "ssim"]
    assert df.scene.nunique() == 2  # each scene under both degradations
    tab = E.table(df, "method", cols)
    assert tab.shape == (3, 1 + 3 * len(cols) + 1)
    assert (tab[[f"{c}_lo" for c in cols]].values <= tab[cols].values + 1e-9).all() and (
        tab[cols].values <= tab[[f"{c}_hi" for c in cols]].values + 1e-9
    ).all()
    win = E.best(tab, cols)
    assert win["region_mse"] == "target" and win["region_hf_err"] == "target"  # the target is perfect in the region
    assert win["mse_bg"] == "input"  # and the input is perfect on its own background
    p = E.paired(df, "input", "input")
    assert p["diff"] == 0 and p["ci_low"] == p["ci_high"] == 0
    assert E.paired(df, "target", "input", "region_mse")["diff"] < 0


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    lo1, hi1 = E.bootstrap_ci(rng.normal(1, 1, 20))
    lo2, hi2 = E.bootstrap_ci(rng.normal(1, 1, 2000))
    assert lo2 < 1 < hi2 and (hi2 - lo2) < (hi1 - lo1)
    x = np.r_[rng.normal(0, 1, 50), rng.normal(0, 1, 50)]  # two copies of one noisy scene set...
    g = np.r_[np.arange(50), np.arange(50)]
    x[50:] = x[:50]
    lo_c, hi_c = E.bootstrap_ci(x, groups=g)  # ...are 50 scenes, not 100 cases: a wider interval
    lo_n, hi_n = E.bootstrap_ci(x)
    assert (hi_c - lo_c) > 1.2 * (hi_n - lo_n)


def test_perceptual_columns_say_unavailable_without_local_weights(monkeypatch):
    monkeypatch.delenv("LABKIT_CLIP", raising=False)
    monkeypatch.delenv("LABKIT_DINO", raising=False)
    p = E.perceptual_models()
    assert set(p) == {"lpips", "dino", "clip"} and all(isinstance(v, str) and "unavailable" in v for v in p.values())


@pytest.mark.slow
def test_sharded_evaluation_two_processes_equal_one(tmp_path, accelerate_launch):
    """`labkit evaluate` under `accelerate launch` with 2 CPU processes: the cases are split across the ranks,
    rank 0 merges and writes, and the table (and every per-case row) equals one process's."""
    import os
    import subprocess
    import sys

    import pandas as pd

    trips = [D.make_triplet(s, "test", 64, factor=2) for s in range(5)]
    data = CS.write_cases(tmp_path / "cases", trips)
    args = ["-m", "labkit", "evaluate", "--data", str(data), "--preset", "tiny", "--methods", "focus", "--steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600, env=env
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = accelerate_launch(2, *args, "--out", tmp_path / "two")
    assert "(2 processes)" in two.stdout
    a, b = (pd.read_csv(tmp_path / d / "per_case.csv") for d in ("one", "two"))
    cols = [c for c in a if c != "seconds_per_case"]
    assert len(a) == 2 * 5 and list(a.case) == list(b.case) and list(a.method) == list(b.method)
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=False, rtol=1e-5)
    ta, tb = (pd.read_csv(tmp_path / d / "table.csv") for d in ("one", "two"))
    pd.testing.assert_frame_equal(
        ta.drop(columns=[c for c in ta if "second" in c]),
        tb.drop(columns=[c for c in tb if "second" in c]),
        check_exact=False,
        rtol=1e-5,
    )


def test_more_cases_are_the_next_draws_of_the_same_set_and_refuse_other_draws():
    from labkit.experiments import benchmark as XB

    bb = labkit.load("tiny")
    kw = dict(kinds=["wrong", "smear"], size=64, split="test", seed=0, room=-100.0)
    scored = E.benchmark_cases(bb, n_per_kind=1, **kw)
    more = XB.more_cases(bb, scored, n_per_kind=3, **kw)
    full = E.benchmark_cases(bb, n_per_kind=3, **kw)
    assert [c.meta["degradation"] for c in more] == ["wrong", "wrong", "smear", "smear"]
    assert all(torch.equal(a.draft, b.draft) for a, b in zip(more, full[1:3] + full[4:6]))
    assert XB.more_cases(bb, full, n_per_kind=2, **kw) == []  # already drawn further: nothing to add
    with pytest.raises(ValueError, match="same seed"):
        XB.more_cases(bb, scored, n_per_kind=3, **kw | dict(seed=1))


def test_never_harms_counts_every_set_and_kind_of_the_stacked_frames():
    import pandas as pd

    from labkit.experiments import benchmark as XB

    def frame(harmed: int, n: int = 20):
        gaps = [-1.0] * harmed + [2.0] * (n - harmed)  # refine minus draft, dB
        rows = [dict(method="draft", case=i, degradation="smear", region_psnr=20.0) for i in range(n)]
        return pd.DataFrame(rows + [dict(r, method="refine", region_psnr=20.0 + g) for r, g in zip(rows, gaps)])

    one, two = frame(1), frame(2)
    df, sets, regs = XB.stacked([(one, "a", dict.fromkeys(range(20), "warp")), (two, "b", {})])
    assert sorted(set(df.case)) == list(range(40)) and sets[25] == "b" and regs[3] == "warp" and regs[25] is None
    c = XB.never_harms_claim(df, "refine", "draft", sets)
    assert c["verdict"] == "refuted" and c["value"] == pytest.approx(0.1) and "a 1/20; b 2/20" in c["note"]
    df, sets, _ = XB.stacked([(one, "a", {}), (frame(0), "b", {})])
    assert XB.never_harms_claim(df, "refine", "draft", sets)["verdict"] == "holds"  # 1 of 20 = 5% is allowed
