"""Small shared helpers: seeding, the per-case seed, atomic writes and JSON, the command-line rules."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

TRACKERS = ("none", "tensorboard", "trackio", "wandb")  # accelerate's experiment trackers (--report-to)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def case_seed(seed: int, i: int) -> int:
    """THE per-case seed recipe: case i of a set drawn with `seed` (sets drawn with different seeds never
    share a case)."""
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
    try:
        return body() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + kept if kept else ''}", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:  # fmt: skip
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


def labkit_wrote(folder: str | os.PathLike) -> bool:
    """Whether a labkit command wrote this folder: every command records its settings in the folder's run.json."""
    return (Path(folder) / "run.json").is_file()


def _holds(outer: Path, inner: Path) -> bool:
    """Whether path `inner` is `outer` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_not_an_input(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], flag: str = "--out") -> None:
    """Refuse an output path that is one of the inputs or a folder holding one (it would overwrite or delete them)."""
    o = Path(out).resolve()
    for i in inputs:
        if _holds(o, Path(i).resolve()):
            raise FileExistsError(f"{flag} {out} is (or holds) the input {i}: write the output somewhere else")


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Refuse an output path that cannot be written (a folder given for a file, a read-only or missing place),
    before any work."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder: give a file name (e.g. {p / 'out.png'})")
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {probe} is not a writable folder; choose another place")


def claim_out_dir(
    out: str | os.PathLike, settings: dict, fresh: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> bool:
    """Check an output folder against a command's settings before any work: a file, an input (or a folder holding
    one) and an unwritable place are refused; a folder with run.json resumes with the same settings (True) and is
    refused with the difference otherwise; a non-empty folder labkit did not write is refused; fresh=True replaces
    only a folder labkit wrote (labkit_wrote). Writes nothing (the caller writes run.json once the inputs check out)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: give a folder path (several files are written there)")
    check_not_an_input(out, inputs)
    check_writable(out / "run.json", "--out")
    ours = out.exists() and labkit_wrote(out)
    if fresh and out.exists() and any(out.iterdir()):
        if not ours:
            raise RunConfigMismatch(
                f"--fresh replaces only a folder labkit wrote (it holds a run.json); {out} does not: "
                "choose another --out"
            )
        shutil.rmtree(out)
    rj = out / "run.json"
    if rj.exists():
        old, new = json.loads(rj.read_text()), json.loads(json.dumps(settings, default=str))
        if old != new:
            raise RunConfigMismatch(
                f"{out} holds a run with other settings ({dict_diff(old, new)}): the same settings resume; "
                "pass --fresh to start over there, or choose another --out"
            )
        return True
    if out.exists() and any(out.iterdir()):
        raise RunConfigMismatch(
            f"{out} is not empty and labkit did not write it (no run.json): choose another --out (--fresh only "
            "replaces labkit's own folders)"
        )
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


def main_process() -> bool:
    """Whether this is the process that writes files (rank 0 under torchrun / accelerate launch; True alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def bootstrap_units(x, groups=None) -> np.ndarray:
    """What a bootstrap resamples: the finite values of x, or with groups (e.g. scene ids) one mean per group."""
    x = np.asarray(x, float)
    ok = ~np.isnan(x)
    if groups is not None:  # cluster bootstrap: one mean per group (groups sorted), resample the groups
        _, g = np.unique(np.asarray(groups)[ok], return_inverse=True)
        return np.bincount(g, x[ok]) / np.bincount(g)
    return x[ok]
