"""Notebook 05_evaluate's analysis of benchmark v3: every number per set × kind × registration outcome, and the
do-no-harm claims (refine never far below its input, beats it on every set, beats the pastes on the object set)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..evaluate import paired
from ..results import claim

HARM_DB = 0.5  # "harm": more than this many dB of region PSNR below the draft
HARM_SHARE = 0.05  # refine_never_harms: at most this share of cases harmed, on every set and kind


def per_set_kind_registration(df: pd.DataFrame, sets: dict[int, str], registered: dict[int, str]) -> pd.DataFrame:
    """Mean region PSNR (dB) and case count per (set, kind, registration) and method: a long table."""
    d = df.assign(set=df.case.map(sets), registration=df.case.map(registered))
    g = d.groupby(["set", "degradation", "registration", "method"], sort=False).region_psnr
    return g.agg(["mean", "count"]).reset_index().rename(columns={"degradation": "kind"})


def harm_shares(df: pd.DataFrame, method: str, draft: str, sets: dict[int, str]) -> pd.DataFrame:
    """Per set and kind: the share of cases where `method` is more than HARM_DB below the draft, and the count."""
    a = df[df.method == method].set_index("case")
    gap = a.region_psnr - df[df.method == draft].set_index("case").region_psnr.reindex(a.index)
    t = pd.DataFrame(dict(set=a.index.map(sets), kind=a.degradation, harmed=gap < -HARM_DB))
    return t.groupby(["set", "kind"]).harmed.agg(["mean", "count"]).rename(columns={"mean": "share"}).reset_index()


def never_harms_claim(df: pd.DataFrame, method: str, draft: str, sets: dict[int, str]) -> dict:
    """refine_never_harms: on every set and kind at most HARM_SHARE of the cases lie more than HARM_DB below the
    draft (an exact count, no CI: value = the worst set × kind's share of harmed cases)."""
    h = harm_shares(df, method, draft, sets)
    worst = h.loc[h.share.idxmax()]
    note = "; ".join(f"{r.set}/{r.kind} {int(round(r.share * r['count']))}/{int(r['count'])}" for _, r in h.iterrows())
    return claim(
        float(worst.share), HARM_SHARE, bool(h.share.max() <= HARM_SHARE),
        f"worst share of test cases > {HARM_DB} dB below the draft (set × kind; baseline: the allowed share)",
        "do no harm (issue 35): labkit.refine's defaults never fall far below their input",
        f"{method} vs {draft}, harmed/total per set/kind: {note}", exact=True,
    )  # fmt: skip


def set_claim(df: pd.DataFrame, a: str, b: str, cases: list[int], paper: str, seed: int = 0) -> dict:
    """a beats b on a subset of cases: the paired bootstrap CI of the region PSNR difference lies above 0."""
    sub = df[df.case.isin(cases)]
    p = paired(sub, a, b, "region_psnr", seed)
    return claim(
        p["value"], p["baseline"], p["ci_low"] > 0, "test region PSNR (dB)", paper,
        f"{a} vs {b}: paired diff {p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] (95% bootstrap CI over "
        f"{p['n_scenes']} scenes, {p['n']} cases)", ci=[p["ci_low"], p["ci_high"]],
    )  # fmt: skip


def kept_counts(infos: list[dict]) -> dict:
    """How often the do-no-harm check kept the editor's output, the paste or the draft (from each output's info)."""
    kept = [i.get("accept", {}).get("kept", "not checked") for i in infos]
    return {k: int(np.sum([x == k for x in kept])) for k in sorted(set(kept))}
