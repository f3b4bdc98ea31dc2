"""What a run reports: paper claims as measured here, and results.json with its provenance (parameters, git
commit, library versions)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .util import REPO, bootstrap_units, write_json


def git_commit() -> str:
    """The current commit (with '-dirty' when labkit/ or notebooks/ differ from it in content), or 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        # content, not stat: with the nbstripout filter (make lab) a notebook that was only run is not a change
        dirty = (
            subprocess.run(
                ["git", "diff", "--quiet", "HEAD", "--", "labkit", "notebooks"],
                cwd=REPO,
                capture_output=True,
                timeout=10,
            ).returncode
            == 1
        )
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on."""
    import diffusers  # heavy: imported where used

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__}
    for name in ("peft", "accelerate", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out


# ------------------------------------------------------------------------------------------------
# the claim record: a paired difference, its CI, the effect it is judged against, a verdict, the smallest effect
# this budget can detect, and (when inconclusive) the budget that would settle it
Z_MDE = 1.96 + 0.84  # two-sided alpha 0.05 and power 0.8: MDE = 2.8 standard errors of the mean difference
VERDICTS = ("holds", "refuted", "inconclusive")


SESOI_DB = 0.5  # the smallest effect of interest in region PSNR where a paper gives no number: about a visible change
SESOI = f"smallest effect of interest: {SESOI_DB} dB (no number in the paper)"
# the effect each method claim is judged against, in its unit (as value - baseline): the paper's, converted from
# ../shared/METHODS.md's reported numbers, or a stated smallest effect of interest
PAPER_EFFECTS: dict[str, tuple[float, str]] = {
    "focus_beats_full": (0.21, "paper: RefineAnything ablation, region MSE 0.020 vs 0.021 w/o focus (10 log10 1.05)"),
    "boundary_loss_helps": (0.61, "paper: RefineAnything ablation, region MSE 0.020 vs 0.023 w/o boundary loss"),
    "freqmole_beats_lora": (0.30, "paper: RefGC-SR2 Table 2, PSNR 17.51 vs 17.21 (best baseline; Table 3 not given)"),
    "frequency_loss_helps": (SESOI_DB, SESOI),
    "sft_beats_frozen": (SESOI_DB, SESOI),
    "sft_beats_frozen_own_instruction": (SESOI_DB, SESOI),
    "crop_beats_full_small_regions": (
        SESOI_DB,
        "smallest effect of interest: 0.5 dB (RefineAnything Fig. 3 is qualitative)",
    ),
    "rl_raises_heldout_reward": (
        0.026,
        "paper: UniRef MultiCom-Bench 0.5398 vs 0.5260 SFT (+2.6 %), as a share of the SFT reward",
    ),
}


def paper_effect(name: str, default: tuple[float, str] = (SESOI_DB, SESOI)) -> dict:
    """claim() keywords for the effect `name` is judged against: PAPER_EFFECTS[name], else `default`."""
    effect, source = PAPER_EFFECTS.get(name, default)
    return dict(effect=effect, effect_source=source)


def bootstrap_means(diffs, groups=None, n: int = 2000, seed: int = 0) -> np.ndarray:
    """(n,) bootstrap means of a paired difference. diffs: (N,) per case, with optional (N,) groups (scene ids:
    whole groups resampled); or a list of such arrays, one per seed (hierarchical: resample seeds, then cases)."""
    per_seed = diffs if isinstance(diffs, (list, tuple)) else [diffs]
    per_group = groups if isinstance(diffs, (list, tuple)) else [groups]
    units = [bootstrap_units(d, g) for d, g in zip(per_seed, per_group or [None] * len(per_seed))]  # per seed
    units = [u for u in units if len(u)]
    if not units:
        return np.full(n, np.nan)
    rng = np.random.default_rng(seed)
    if len(units) == 1:
        u = units[0]
        return u[rng.integers(0, len(u), (n, len(u)))].mean(1)
    pick = rng.integers(0, len(units), (n, len(units)))  # seeds, then cases within each picked seed
    out = np.empty(n)
    for b in range(n):
        out[b] = np.mean([units[s][rng.integers(0, len(units[s]), len(units[s]))].mean() for s in pick[b]])
    return out


def verdict(ci: tuple[float, float], effect: float, threshold: float = 0.0, band=None) -> str:
    """holds: the CI lies above `threshold` (or inside `band`); refuted: the CI excludes the paper's effect or lies
    below zero (or misses `band`); inconclusive: the CI spans both. ci/effect/threshold oriented (+ = the claim)."""
    lo, hi = ci
    if band is not None:
        return (
            "holds"
            if band[0] <= lo and hi <= band[1]
            else ("refuted" if hi < band[0] or lo > band[1] else "inconclusive")
        )
    if lo > threshold:
        return "holds"
    return "refuted" if hi < effect or hi < 0 else "inconclusive"


def budget(n_cases: int, n_seeds: int, mde: float, effect: float) -> dict:
    """The budget that would detect `effect` at this variance (the MDE falls as 1/sqrt(units)): cases at these
    seeds, or seeds at these cases (training steps unchanged)."""
    k = (mde / abs(effect)) ** 2 if effect else float("inf")
    grow = lambda n: int(np.ceil(n * k)) if np.isfinite(k) else None  # noqa: E731
    return dict(scale=round(k, 2), cases=grow(n_cases), seeds=grow(n_seeds) if n_seeds > 1 else None)


def claim(value: float, baseline: float, unit: str, paper: str, *, diffs=None, groups=None, holds: bool | None = None,
          effect: float | None = None, effect_source: str = "", threshold: float = 0.0, band=None,
          lower_is_better: bool = False, note: str = "", seed: int = 0, **extra) -> dict:  # fmt: skip
    """One paper claim as measured here, with its verdict computed (never typed in). Either a comparison: `diffs`,
    the paired differences value-side - baseline-side per case (or a list per seed; `groups` for scene clusters),
    judged against `effect` (the paper's effect, or a stated smallest effect of interest: `effect_source` says
    which; in the claim's unit, as value - baseline) -> ci, mde, verdict, budget; or an exact count / bit-exact
    check: `holds` -> exact: true, no CI."""
    out = dict(value=_num(value), baseline=_num(baseline), unit=unit, paper=paper, note=note)
    if (diffs is None) == (holds is None):
        raise ValueError("a claim is either a comparison (diffs=...) or an exact check (holds=...), not both or none")
    if holds is not None:
        v = "holds" if holds else "refuted"
        return out | dict(verdict=v, holds=bool(holds), exact=True) | extra
    if effect is None or not effect_source:
        raise ValueError(
            "a comparison needs effect= (the paper's, or a smallest effect of interest) and effect_source="
        )
    sign = -1.0 if lower_is_better else 1.0
    means = bootstrap_means(diffs, groups, seed=seed)
    ci = (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    mde = Z_MDE * float(np.std(means))
    oriented = tuple(sorted((sign * ci[0], sign * ci[1])))
    band_o = None if band is None else tuple(sorted((sign * band[0], sign * band[1])))
    v = verdict(oriented, sign * effect, sign * threshold, band_o)
    per_seed = diffs if isinstance(diffs, (list, tuple)) else [diffs]
    n_cases, n_seeds = int(np.mean([len(d) for d in per_seed])), len(per_seed)
    out |= dict(verdict=v, holds=v == "holds", diff=_num(np.nanmean(np.concatenate([np.ravel(d) for d in per_seed]))),
                ci=[ci[0], ci[1]], mde=mde, paper_effect=_num(effect), paper_effect_source=effect_source,
                n_cases=n_cases, n_seeds=n_seeds)  # fmt: skip
    if band is not None:
        out["band"] = [float(band[0]), float(band[1])]
    if v == "inconclusive":
        out["budget"] = budget(n_cases, n_seeds, mde, effect if band is None else min(map(abs, band)))
    return out | extra


def _num(x: Any) -> Any:
    return float(x) if isinstance(x, (np.generic, float, int, torch.Tensor)) and not isinstance(x, bool) else x


def write_results(out_dir: str | os.PathLike, preset: str, params: dict, claims: dict, **numbers) -> Path:
    """Write out_dir/results.json: claims, params, preset, git commit, versions and the key numbers."""
    if not claims:
        raise ValueError('results.json needs at least one claim (see docs/ARCHITECTURE.md, "Results and claims")')
    bad = [
        f"{k}.{f}={c.get(f)}"
        for k, c in claims.items()
        for f in ("value", "baseline", "mde")
        if isinstance(c.get(f), float) and not np.isfinite(c[f])
    ]
    no_verdict = [k for k, c in claims.items() if c.get("verdict") not in VERDICTS]
    if no_verdict:
        raise ValueError(f"claims without a verdict ({', '.join(no_verdict)}): make them with labkit.results.claim")
    if bad:
        raise ValueError(
            f"non-finite claim numbers ({', '.join(bad[:3])}): a run produced NaN/inf; results.json not written "
            "- find the step that diverged (the training loop stops on non-finite losses) before reporting"
        )
    obj = dict(claims=claims, preset=preset, params=params, git=git_commit(), versions=versions(), **numbers)
    return write_json(obj, Path(out_dir) / "results.json")
