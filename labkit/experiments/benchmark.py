"""Notebook 05_evaluate's analysis of benchmark v3: every number per set × kind × registration outcome, and the
do-no-harm claims (refine never far below its input, beats it on every set, beats the pastes on the object set);
and v2's planar analysis (what the registered paste loses, the val choice of labkit.refine's defaults)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from .. import focus as F_
from .. import inference as I
from ..evaluate import benchmark_cases, paired, run, table
from ..frequency import lowpass
from ..results import claim, paper_effect

HARM_DB = 0.5  # "harm": more than this many dB of region PSNR below the draft
HARM_SHARE = 0.05  # refine_never_harms: at most this share of cases harmed, on every set and kind


def more_cases(bb, scored: list, **kw) -> list:
    """benchmark_cases(bb, **kw) without the cases already scored: each kind's draws are sequential, so a larger
    n_per_kind only appends to `scored`'s (checked: its cases must be each kind's first draws; none when it has
    n_per_kind already)."""
    old = {k: [c for c in scored if c.meta["degradation"] == k] for k in kw["kinds"]}
    n = max([kw["n_per_kind"]] + [len(v) for v in old.values()])
    drawn, out = benchmark_cases(bb, **kw | dict(n_per_kind=n)), []
    for j, (kind, have) in enumerate(old.items()):
        block = drawn[j * n : (j + 1) * n]
        if not all(torch.equal(a.draft, b.draft) for a, b in zip(block, have)):
            raise ValueError(
                f"the scored {kind!r} cases are not the first draws of this set: pass the same seed and kw"
            )
        out += block[len(have) : kw["n_per_kind"]]
    return out


def stacked(parts: list[tuple[pd.DataFrame, str | dict[int, str], dict[int, str]]]) -> tuple[pd.DataFrame, dict, dict]:
    """Per-case frames of several sets as one (cases renumbered): parts = (frame, its set's name or case -> set,
    case -> registration used); returns (frame, case -> set, case -> registration)."""
    frames, sets, regs, off = [], {}, {}, 0
    for df, set_of, reg in parts:
        cases = sorted(set(df.case)) if len(df) else []
        frames.append(df.assign(case=df.case + off))
        sets |= {i + off: set_of if isinstance(set_of, str) else set_of[i] for i in cases}
        regs |= {i + off: reg.get(i) for i in cases}
        off += max(cases, default=-1) + 1
    return pd.concat(frames, ignore_index=True), sets, regs


def harm_figure(df: pd.DataFrame, method: str, draft: str, sets: dict[int, str]):
    """Per set × kind, each case's region PSNR of `method` minus the draft's (dots), with the harm line (-HARM_DB):
    (figure, the shares table)."""
    import matplotlib.pyplot as plt  # heavy: imported only when a figure is drawn

    groups = sorted(gaps(df, method, draft, sets).groupby(["set", "kind"]).gap)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for x, (_, g) in enumerate(groups):
        jitter = np.random.default_rng(x).uniform(-0.25, 0.25, len(g))
        ax.scatter(x + jitter, g.clip(lower=-10), s=9, c=np.where(g < -HARM_DB, "crimson", "steelblue"))
    ax.axhline(-HARM_DB, color="crimson", lw=0.8, ls="--", label=f"harm: > {HARM_DB} dB below the draft")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xticks(range(len(groups)), [f"{s}\n{k}" for (s, k), _ in groups], fontsize=7)
    ax.set_ylabel(f"{method} − draft (dB, clipped at −10)", fontsize=8), ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, harm_shares(df, method, draft, sets)


def per_set_kind_registration(df: pd.DataFrame, sets: dict[int, str], registered: dict[int, str]) -> pd.DataFrame:
    """Mean region PSNR (dB) and case count per (set, kind, registration) and method: a long table."""
    d = df.assign(set=df.case.map(sets), registration=df.case.map(registered))
    g = d.groupby(["set", "degradation", "registration", "method"], sort=False).region_psnr
    return g.agg(["mean", "count"]).reset_index().rename(columns={"degradation": "kind"})


def gaps(df: pd.DataFrame, method: str, draft: str, sets: dict[int, str]) -> pd.DataFrame:
    """Per case: its set, kind and `method`'s region PSNR minus the draft's (dB)."""
    a = df[df.method == method].set_index("case")
    gap = a.region_psnr - df[df.method == draft].set_index("case").region_psnr.reindex(a.index)
    return pd.DataFrame(dict(set=a.index.map(sets), kind=a.degradation, gap=gap))


def harm_shares(df: pd.DataFrame, method: str, draft: str, sets: dict[int, str]) -> pd.DataFrame:
    """Per set and kind: the share of cases where `method` is more than HARM_DB below the draft, and the count."""
    t = gaps(df, method, draft, sets).assign(harmed=lambda t: t.gap < -HARM_DB)
    return t.groupby(["set", "kind"]).harmed.agg(["mean", "count"]).rename(columns={"mean": "share"}).reset_index()


def never_harms_claim(df: pd.DataFrame, method: str, draft: str, sets: dict[int, str]) -> dict:
    """refine_never_harms: on every set and kind at most HARM_SHARE of the cases lie more than HARM_DB below the
    draft (an exact count, no CI: value = the worst set × kind's share of harmed cases)."""
    h = harm_shares(df, method, draft, sets)
    worst = h.loc[h.share.idxmax()]
    n_harmed = (h.share * h["count"]).round().astype(int)
    note = "; ".join(f"{r.set}/{r.kind} {k}/{int(r['count'])}" for k, (_, r) in zip(n_harmed, h.iterrows()))
    per_set = h.assign(harmed=n_harmed).groupby("set")[["harmed", "count"]].sum()
    note += " | per set: " + "; ".join(f"{s} {int(r.harmed)}/{int(r['count'])}" for s, r in per_set.iterrows())
    return claim(
        float(worst.share), HARM_SHARE,
        f"worst share of test cases > {HARM_DB} dB below the draft (set × kind; baseline: the allowed share)",
        "do no harm (issue 35): labkit.refine's defaults never fall far below their input",
        holds=bool(h.share.max() <= HARM_SHARE), note=f"an exact count; {method} vs {draft}, harmed/total: {note}",
    )  # fmt: skip


def below_paste_claim(frames: list[tuple[pd.DataFrame, dict[int, str]]], method: str, paste: str) -> dict:
    """refine_never_below_registered_paste: where a registration holds (registered[case] == "warp"), `method` is
    never more than HARM_DB below the registered paste (an exact count over every set's frame)."""
    gaps = []
    for df, registered in frames:
        a = df[df.method == method].set_index("case").region_psnr
        b = df[df.method == paste].set_index("case").region_psnr.reindex(a.index)
        gaps += [float(a[i] - b[i]) for i in a.index if registered.get(i) == "warp"]
    below = int(np.sum(np.asarray(gaps) < -HARM_DB))
    return claim(
        below, 0, f"registered test cases more than {HARM_DB} dB below the registered paste (of {len(gaps)})",
        "do no harm (issue 35): where a registration holds, refine keeps what the paste gives", holds=below == 0,
        note=f"an exact count; worst gap {min(gaps, default=0.0):+.2f} dB",
    )  # fmt: skip


def set_claim(df: pd.DataFrame, a: str, b: str, cases: list[int], paper: str, seed: int = 0) -> dict:
    """a beats b on a subset of cases: the paired bootstrap over its scenes, against the smallest effect of
    interest."""
    p = paired(df[df.case.isin(cases)], a, b, "region_psnr", seed)
    return claim(
        p["value"], p["baseline"], "test region PSNR (dB)", paper, diffs=p["diffs"], groups=p["groups"], seed=seed,
        note=f"{a} vs {b}: paired over {p['n_scenes']} scenes, {p['n']} cases", **paper_effect(""),
    )  # fmt: skip


def kept_counts(infos: list[dict]) -> dict:
    """How often the do-no-harm check kept the editor's output, the paste (or shifted) or the draft (from each info)."""
    kept = [i.get("accept", {}).get("kept", "not checked") for i in infos]
    return {k: int(np.sum([x == k for x in kept])) for k in sorted(set(kept))}


# ------------------------------------------------------------------------------------------------
# the planar set's analysis: what the registered paste loses, and the val choice of labkit.refine's defaults
def focus_resample(
    img: torch.Tensor, mask: torch.Tensor, working_area: int, multiple: int, margin: float = 16
) -> torch.Tensor:
    """img (3, H, W) through Focus-and-Refine's crop resampling alone: the focus crop upsampled to the working area,
    resized back and soft-pasted as refine pastes (no VAE, no editor): what the round trip costs a region's detail."""
    c, _, box = F_.focus_crop(img, mask, working_area, multiple, margin)
    return F_.paste_back(img, c, box, F_.seam_mask(F_.crop(mask, box)))


def high_frequency_share(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, sigma: float = 3.0) -> float:
    """Share of the region's squared error (3, H, W) above a Gaussian low-pass at `sigma` px: near 1 when what is
    left is fine detail or sub-pixel misalignment, near 0 when it is light and colour."""
    e, m = (out - target)[None], mask[0] > 0.5  # (1, 3, H, W), (H, W)
    total = float(e[0][:, m].pow(2).sum())
    return float((e - lowpass(e, sigma))[0][:, m].pow(2).sum()) / max(total, 1e-12)


def choose_defaults(
    cases: Sequence,
    candidates: dict[str, dict],
    preset: str = "mini",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[pd.DataFrame, str]:
    """Each candidate setting of labkit.refine (name -> keyword arguments) on the (val) cases: a table of mean
    region PSNR / background error, and the name of the best by region PSNR."""
    runners = {
        name: (
            lambda c, kw=kw: I.refine_tensor(
                c.draft, c.mask, c.reference, seed=seed, preset=preset, device=device, **kw
            )
        )
        for name, kw in candidates.items()
    }
    df, _ = run(cases, runners, lambda c: c.draft, progress=progress, keep=[])
    tab = table(df, "method", ["region_psnr", "mse_bg"], seed=seed)
    return tab, str(tab.set_index("method").region_psnr.idxmax())
