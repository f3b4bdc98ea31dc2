"""The claim record (labkit.results.claim): verdicts computed from the paired CI against the paper's effect, the
smallest detectable effect, the budget that would settle an inconclusive claim, and exact checks without a CI."""

import numpy as np
import pytest

from labkit import results as R


def _diffs(mean: float, sd: float, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, sd, n)


def test_a_clear_gain_holds_and_a_clear_loss_is_refuted():
    up = R.claim(20.0, 19.0, "dB", "p", diffs=_diffs(1.0, 0.3, 30), effect=0.5, effect_source="s")
    assert up["verdict"] == "holds" and up["holds"] and up["ci"][0] > 0 and "budget" not in up
    down = R.claim(19.0, 20.0, "dB", "p", diffs=_diffs(-1.0, 0.3, 30), effect=0.5, effect_source="s")
    assert down["verdict"] == "refuted" and not down["holds"] and down["ci"][1] < 0


def test_a_tie_is_refuted_only_when_its_ci_excludes_the_papers_effect():
    tight = R.claim(0, 0, "dB", "p", diffs=_diffs(0.0, 0.1, 60), effect=1.0, effect_source="s")
    assert tight["ci"][0] < 0 < tight["ci"][1] and tight["verdict"] == "refuted"  # the paper's 1 dB is ruled out
    wide = R.claim(0, 0, "dB", "p", diffs=_diffs(0.0, 3.0, 8), effect=1.0, effect_source="s")
    assert wide["verdict"] == "inconclusive" and wide["ci"][0] < 0 < 1.0 < wide["ci"][1]
    b = wide["budget"]  # the budget that would detect 1 dB: more cases than now, from the measured variance
    assert b["cases"] > 8 and b["scale"] == pytest.approx((wide["mde"] / 1.0) ** 2, rel=0.02)


def test_the_mde_shrinks_with_more_cases_and_tracks_the_noise():
    few = R.claim(0, 0, "dB", "p", diffs=_diffs(0.0, 1.0, 10), effect=1, effect_source="s")["mde"]
    many = R.claim(0, 0, "dB", "p", diffs=_diffs(0.0, 1.0, 160), effect=1, effect_source="s")["mde"]
    assert many < few / 2.5  # ~1/sqrt(16) = 1/4
    assert many == pytest.approx(2.8 / np.sqrt(160), rel=0.2)


def test_lower_is_better_thresholds_and_bands():
    c = R.claim(0.8, 1.0, "ratio", "p", diffs=_diffs(-0.2, 0.02, 20), lower_is_better=True, threshold=-0.1,
                effect=-0.1, effect_source="s")  # fmt: skip
    assert c["verdict"] == "holds"
    c = R.claim(0.95, 1.0, "ratio", "p", diffs=_diffs(-0.05, 0.01, 20), lower_is_better=True, threshold=-0.1,
                effect=-0.1, effect_source="s")  # fmt: skip
    assert c["verdict"] == "refuted"  # lower, but not by the stated 10 %: the CI excludes the effect
    inside = R.claim(
        0.5, 0.5, "share", "p", diffs=_diffs(0.02, 0.05, 100), band=(-0.15, 0.15), effect=0.03, effect_source="s"
    )
    outside = R.claim(
        0.0, 0.5, "share", "p", diffs=np.full(50, -0.5), band=(-0.15, 0.15), effect=0.03, effect_source="s"
    )
    assert inside["verdict"] == "holds" and outside["verdict"] == "refuted"


def test_seeds_are_pooled_hierarchically():
    """Three seeds whose means differ: the pooled CI is wider than one seed's and covers the spread of seeds."""
    seeds = [_diffs(m, 0.2, 16, s) for s, m in enumerate((0.2, 0.9, -0.3))]
    one = R.claim(0, 0, "dB", "p", diffs=seeds[0], effect=0.5, effect_source="s")
    pooled = R.claim(0, 0, "dB", "p", diffs=seeds, effect=0.5, effect_source="s")
    assert pooled["n_seeds"] == 3 and pooled["n_cases"] == 16
    assert (pooled["ci"][1] - pooled["ci"][0]) > 2 * (one["ci"][1] - one["ci"][0])
    assert pooled["verdict"] == "inconclusive" and pooled["budget"]["seeds"] > 3


def test_exact_checks_carry_no_ci_and_a_claim_must_be_one_or_the_other():
    c = R.claim(0, 0, "pixels", "p", holds=True, note="bit-exact")
    assert c["exact"] and c["verdict"] == "holds" and "ci" not in c
    assert R.claim(3, 0, "pixels", "p", holds=False)["verdict"] == "refuted"
    with pytest.raises(ValueError, match="either a comparison"):
        R.claim(0, 0, "u", "p")
    with pytest.raises(ValueError, match="effect"):
        R.claim(0, 0, "u", "p", diffs=[1.0, 2.0])  # a comparison names what it is judged against


def test_results_refuse_a_claim_without_a_verdict(tmp_path):
    with pytest.raises(ValueError, match="without a verdict"):
        R.write_results(tmp_path, "tiny", {}, dict(x=dict(value=1.0, baseline=0.0, holds=True)))
    assert not (tmp_path / "results.json").exists()
