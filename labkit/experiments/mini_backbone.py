"""Notebook 00_mini_backbone's experiment code: its claims from the pretraining evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..presets import get
from ..results import claim, paper_effect

RETRAINABLE = ("tiny", "mini")  # the backbones labkit trains from scratch (`labkit train mini`)


def check_retrain(preset: str) -> None:
    """Refuse to retrain a backbone labkit did not train (a pipeline folder, flux-kontext), naming the fix."""
    if get(preset).name not in RETRAINABLE:
        raise ValueError(
            f"retrain_steps > 0 retrains labkit's own small backbone ({' | '.join(RETRAINABLE)}); {preset!r} is a "
            "real/pipeline model: set retrain_steps = 0 to evaluate it as it is, or fine-tune adapters on it in 04"
        )


def training_card(weights: str | Path | None) -> dict | None:
    """The card.json labkit writes beside the weights it trained (curves, recipe, sha256); None for other weights."""
    f = Path(weights or "") / "card.json"
    return json.loads(f.read_text()) if weights and f.is_file() else None


def copy_claim(ev: dict, near: float = 1.5, room: float = 1.0, editor: str = "editor") -> dict:
    """Claim editor_copies_aligned_reference from evaluate_refine(reference='target'): on every kind of damage
    whose ceiling leaves room (VAE-through-focus ceiling > draft + `room` dB), the editor's region PSNR is above
    the draft's and within `near` dB of the ceiling; kinds without room are listed, not judged."""
    bk = {k: {c: x for c, x in v.items() if c != "skipped_no_room"} for k, v in ev["by_kind"].items()}
    judged = {k: v for k, v in bk.items() if v["ceiling"] > v["draft"] + room}
    ok = {k: v[editor] > v["draft"] and v[editor] >= v["ceiling"] - near for k, v in judged.items()}
    worst = min(judged, key=lambda k: judged[k][editor] - judged[k]["draft"]) if judged else None
    per = "; ".join(
        f"{k} {v[editor]:.1f} vs draft {v['draft']:.1f} / ceiling {v['ceiling']:.1f}" for k, v in bk.items()
    )
    return claim(
        sum(ok.values()),
        len(judged),
        f"kinds of damage (of {len(bk)}; those with > {room} dB room) where the editor given the target crop "
        "as the aligned "
        f"reference beats the draft and lands within {near} dB of the VAE-through-focus ceiling (region PSNR)",
        "Kontext/Refine-by-Align: an editor copies from an aligned reference",
        holds=bool(judged) and all(ok.values()),
        note="an exact count of kinds; "
        + (f"worst: {worst}; " if worst else "")
        + f"no room: {sorted(set(bk) - set(judged)) + ev.get('no_room', []) or 'none'}; "
        + per,
        by_kind={k: {c: round(float(x), 3) for c, x in v.items()} for k, v in bk.items()},
    )


def baseline_claim(
    r: dict,
    unit: str,
    value: str = "editor",
    base: str = "input",
    paper: str = "Kontext-style editing (pretraining sanity)",
    note: str = "",
    *,
    strong: bool = False,
    seed: int = 0,
    threshold: float = 0.0,
) -> dict:
    """Claim 'the editor beats this no-model baseline' from one task's pretrain.evaluate() row: the paired
    difference per example (r["per_case"]; strong: only the strong artifacts; holds when its CI lies above
    `threshold`), with `reachable`: whether the VAE
    round trip of the target (any latent editor's ceiling) lies above the baseline at all."""
    per = {k: np.asarray(v) for k, v in r["per_case"].items()}
    keep = np.asarray(r["strong"], bool) if strong else np.ones(len(per[value]), bool)
    a, b, ceiling = (per[k][keep] for k in (value, base, "vae_ceiling"))
    room = ceiling.mean() > b.mean()
    why = f"VAE ceiling {ceiling.mean():.2f} dB {'>' if room else '<='} baseline: " + (
        "reachable" if room else "no latent editor can beat this baseline with this VAE"
    )
    if "editor_mean" in per:
        why += f"; posterior-mean (1-step) output {per['editor_mean'][keep].mean():.2f} dB"
    note = "; ".join(x for x in (note, why) if x)
    return claim(
        a.mean(), b.mean(), unit, paper, diffs=a - b, seed=seed, threshold=threshold, note=note, reachable=bool(room),
        **paper_effect(""),
    )  # fmt: skip
