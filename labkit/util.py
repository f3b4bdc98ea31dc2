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


def case_seed(seed: int, i: int) -> int:
    """THE per-case seed recipe: case i of a set drawn with `seed` (sets drawn with different seeds never share a case)."""
    return seed * 100_003 + i


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
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file: give a folder path (a whole folder is written there)")
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


# ------------------------------------------------------------------------------------------------
# command lines: one exit-code rule (2 = usage or bad input, 1 = a failed run), run.json output folders
USAGE, FAILED, INTERRUPTED = 2, 1, 130


class RunConfigMismatch(ValueError):
    """An output folder holds a run made with other settings (a usage error: --fresh, or another folder)."""


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf (loss, gradient norm or an evaluation number); nothing was saved for that step."""


def run_cli(prog: str, body: Callable[[], int | None], kept: str = "") -> int:
    """Run a command's body under the one exit-code rule; Ctrl-C prints one line saying what was kept."""
    import sys
    try:
        return body() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + kept if kept else ''}", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USAGE
    except NonFiniteError as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return FAILED


def dict_diff(a: dict, b: dict, prefix: str = "") -> str:
    """The first few keys where two nested dicts differ, as 'key: old -> new'."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            d = dict_diff(x, y, f"{prefix}{k}.")
            out += [d] if d else []
        elif x != y:
            out.append(f"{prefix}{k}: {x} -> {y}")
    return "; ".join(out[:4])


def claim_out_dir(out: str | os.PathLike, settings: dict, fresh: bool = False) -> bool:
    """Check an output folder against a command's settings before any work: a file is refused; a folder with
    run.json resumes with the same settings (True) and is refused with the difference otherwise; a non-empty
    folder without run.json is refused; fresh=True clears it first. Writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: give a folder path (several files are written there)")
    if fresh and out.exists():
        shutil.rmtree(out)
    rj = out / "run.json"
    if rj.exists():
        old, new = json.loads(rj.read_text()), json.loads(json.dumps(settings, default=str))
        if old != new:
            raise RunConfigMismatch(f"{out} holds a run with other settings ({dict_diff(old, new)}): the same settings resume; "
                                    "pass --fresh to start over there, or choose another --out")
        return True
    if out.exists() and any(out.iterdir()):
        raise RunConfigMismatch(f"{out} is not empty and holds no run.json (not a labkit output): choose another --out, "
                                "or pass --fresh to replace it")
    return False


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
        raise ValueError("results.json needs at least one claim (see docs/ARCHITECTURE.md, \"Results and claims\")")
    bad = [f"{k}.{f}={c.get(f)}" for k, c in claims.items() for f in ("value", "baseline")
           if isinstance(c.get(f), float) and not np.isfinite(c[f])]
    if bad:
        raise ValueError(f"non-finite claim numbers ({', '.join(bad[:3])}): a run produced NaN/inf; results.json not written "
                         "- find the step that diverged (the training loop stops on non-finite losses) before reporting")
    obj = dict(claims=claims, preset=preset, params=params, git=git_commit(), versions=versions(), **numbers)
    return write_json(obj, Path(out_dir) / "results.json")


def main_process() -> bool:
    """Whether this is the process that writes files (rank 0 under torchrun / accelerate launch; True alone)."""
    return int(os.environ.get("RANK", "0")) == 0
