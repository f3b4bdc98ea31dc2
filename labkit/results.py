"""What a run reports: paper claims as measured here, and results.json with its provenance (parameters, git
commit, library versions)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .util import REPO, write_json


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


def claim(value: float, baseline: float, holds: bool, unit: str, paper: str, note: str = "", **extra) -> dict:
    """One paper claim as measured here: value vs baseline, and whether it holds on this backbone."""
    return dict(
        value=_num(value), baseline=_num(baseline), unit=unit, holds=bool(holds), paper=paper, note=note, **extra
    )


def _num(x: Any) -> Any:
    return float(x) if isinstance(x, (np.generic, float, int, torch.Tensor)) and not isinstance(x, bool) else x


def write_results(out_dir: str | os.PathLike, preset: str, params: dict, claims: dict, **numbers) -> Path:
    """Write out_dir/results.json: claims, params, preset, git commit, versions and the key numbers."""
    if not claims:
        raise ValueError('results.json needs at least one claim (see docs/ARCHITECTURE.md, "Results and claims")')
    bad = [
        f"{k}.{f}={c.get(f)}"
        for k, c in claims.items()
        for f in ("value", "baseline")
        if isinstance(c.get(f), float) and not np.isfinite(c[f])
    ]
    if bad:
        raise ValueError(
            f"non-finite claim numbers ({', '.join(bad[:3])}): a run produced NaN/inf; results.json not written "
            "- find the step that diverged (the training loop stops on non-finite losses) before reporting"
        )
    obj = dict(claims=claims, preset=preset, params=params, git=git_commit(), versions=versions(), **numbers)
    return write_json(obj, Path(out_dir) / "results.json")
