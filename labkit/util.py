"""Small shared helpers: seeding, atomic writes, results.json with claims and provenance."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def atomic_save(write: Callable[[str], Any], path: str | os.PathLike) -> Path:
    """Call write(tmp_path) then rename onto path, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder at once: yields a temporary sibling to fill; when the block ends without an
    error it replaces `path` (two renames), so readers see the old folder or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():  # a kill between the two renames of an earlier swap
        old.rename(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # what a killed earlier writer left behind
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write JSON (numpy scalars and arrays converted)."""
    def default(o):
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return np.asarray(o.tolist() if isinstance(o, torch.Tensor) else o).tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")
    text = json.dumps(obj, indent=2, default=default, allow_nan=True)
    return atomic_save(lambda p: Path(p).write_text(text + "\n"), path)


def git_commit() -> str:
    """The current commit (with '-dirty' when labkit/ or notebooks/ differ from it in content), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
        # content, not stat: with the nbstripout filter (make lab) a notebook that was only run is not a change
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "labkit", "notebooks"], cwd=REPO, capture_output=True,
                               timeout=10).returncode == 1
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on."""
    import diffusers
    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__}
    for name in ("peft", "accelerate", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out


def claim(value: float, baseline: float, holds: bool, unit: str, paper: str, note: str = "", **extra) -> dict:
    """One paper claim as measured here: value vs baseline, and whether it holds on this backbone."""
    return dict(value=_num(value), baseline=_num(baseline), unit=unit, holds=bool(holds), paper=paper, note=note, **extra)


def _num(x: Any) -> Any:
    return float(x) if isinstance(x, (np.generic, float, int, torch.Tensor)) and not isinstance(x, bool) else x


def write_results(out_dir: str | os.PathLike, preset: str, params: dict, claims: dict, **numbers) -> Path:
    """Write out_dir/results.json: claims, params, preset, git commit, versions and the key numbers."""
    if not claims:
        raise ValueError("results.json needs at least one claim (see DESIGN.md)")
    bad = [f"{k}.{f}={c.get(f)}" for k, c in claims.items() for f in ("value", "baseline")
           if isinstance(c.get(f), float) and not np.isfinite(c[f])]
    if bad:
        raise ValueError(f"non-finite claim numbers ({', '.join(bad[:3])}): a run produced NaN/inf; results.json not written "
                         "- find the step that diverged (the training loop stops on non-finite losses) before reporting")
    obj = dict(claims=claims, preset=preset, params=params, git=git_commit(), versions=versions(), **numbers)
    return write_json(obj, Path(out_dir) / "results.json")
