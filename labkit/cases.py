"""Cases from users: a folder with metadata.jsonl (draft, reference(s), mask, optional target and prompt per line),
validated before any work, and written back (the studio's Save, `labkit evaluate` sets)."""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import presets as P
from .data import SPLITS, hash_str
from .images import as_image_tensor, as_mask_tensor, bbox_of, read_image, resize, resize_mask, to_numpy
from .util import atomic_save

CASE_FORMAT = (
    "one JSON object per line: draft, reference (a path or a list), mask, target (optional), prompt (optional), "
    "split (train|val|test, optional), id (optional); paths relative to the folder"
)


@dataclass
class Case:
    """One user case: the draft to refine, its reference(s), the mask; target, prompt and split when given.
    Exposes the names a Triplet has (target, reference, extra_refs, draft, mask, ref_mask, meta), so evaluators and
    SFT take either (`require_targets` first where a target is needed)."""

    name: str
    draft: torch.Tensor  # (3, H, W)
    references: list  # of (3, h, w), any size
    mask: torch.Tensor  # (1, H, W) in {0, 1}
    target: torch.Tensor | None  # (3, H, W)
    prompt: str | None
    split: str
    meta: dict = field(default_factory=dict)

    @property
    def reference(self) -> torch.Tensor:
        """The first reference at the draft's size (what banks stack; refine packs references at their own size)."""
        return resize(self.references[0], self.draft.shape[-2:])

    @property
    def extra_refs(self) -> list:
        return [resize(r, self.draft.shape[-2:]) for r in self.references[1:]]

    @property
    def ref_mask(self) -> torch.Tensor:
        return torch.ones_like(self.mask)  # where the region lies in a user's reference is unknown

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return bbox_of(self.mask)

    def resized(self, size: int) -> Case:
        """The case at size x size (SFT batches need one shape; aspect is not kept)."""
        r = lambda x, mode="bicubic": resize(x, size, mode)  # noqa: E731
        return Case(
            self.name,
            r(self.draft),
            [r(x) for x in self.references],
            resize_mask(self.mask, (size, size)),
            None if self.target is None else r(self.target),
            self.prompt,
            self.split,
            self.meta,
        )


def require_targets(cases: Sequence, why: str = "scores") -> None:
    """Refuse, before any work, cases without a target where one is needed (scores, SFT)."""
    for c in cases:
        if getattr(c, "target", None) is None:
            raise ValueError(
                f'case {getattr(c, "name", "?")!r} has no target: {why} need one (add "target" to its line in '
                "metadata.jsonl)"
            )


def _split_of(key: str) -> str:
    """The deterministic split of a case without one: 80 / 10 / 10 by a stable hash of its draft path."""
    u = hash_str(key) % 10
    return "train" if u < 8 else "val" if u == 8 else "test"


def _read_case_file(folder: Path, problems: list[str], rel: str, what: str, kind: Callable | None = as_image_tensor):
    """One file of a case line as a tensor (kind) or a PIL image (kind=None); a problem is noted, not raised."""
    try:
        return kind(read_image(folder / rel, what), f"{what} {rel!r}") if kind else read_image(folder / rel, what)
    except ValueError as e:
        msg = str(e).replace(repr(str(folder / rel)), repr(rel))
        problems.append(msg + (f" in {folder} (paths are relative to the folder)" if msg.endswith("not found") else ""))


def case_id_problem(name) -> str:
    """What is wrong with a case id as an output file name ('' when it is fine): it must be a non-empty string or
    integer, without path separators, not '.'/'..' and not hidden, so outputs stay inside --out, one file per case."""
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        return f"must be a string or an integer, not {type(name).__name__}"
    name = str(name)
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        return "holds a path separator: an id names one output file inside --out"
    if name.startswith("."):
        return "starts with '.': it would be a hidden file (or leave --out)"
    return ""


def case_id_key(name: str) -> str:
    """An id as a file system sees it (Unicode-normalised, case-folded): two ids with the same key collide."""
    return unicodedata.normalize("NFC", name).casefold()


def load_cases(folder: str | Path, split: str | None = None, preset: str | None = None) -> list[Case]:
    """Every case of a case folder (or those of one split), validated before any work starts: an error
    names the line, the file and the fix, listing every problem found (all of a line's, too). With a preset,
    each case's prompt is checked against what that backbone understands (learned instructions on tiny/mini)."""
    folder = Path(folder)
    prompt_ok = P.prompt_checker(preset) if preset is not None else None
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(f"no metadata.jsonl in {folder}: write {CASE_FORMAT}")
    if not meta.is_file():
        raise ValueError(f"{meta} is a folder, not a file: write the case lines into a file named metadata.jsonl")
    raw = meta.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (what Notepad writes) is read, not refused
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{meta} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): save the file as UTF-8"
        ) from None
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cases, errors, seen = [], [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg}); write {CASE_FORMAT}")
            continue
        if not isinstance(row, dict) or not all(k in row for k in ("draft", "reference", "mask")):
            errors.append(f"{where}: needs draft, reference and mask; write {CASE_FORMAT}")
            continue
        refs = row["reference"] if isinstance(row["reference"], list) else [row["reference"]]
        kinds = [("draft", row["draft"]), ("mask", row["mask"])] + [("reference", r) for r in refs]
        bad = [f"{k} {v!r} is a {type(v).__name__}" for k, v in kinds if not isinstance(v, str) or not v]
        if bad or not refs:
            why = "; ".join(bad) or "reference is an empty list"
            errors.append(f"{where}: {why}: give file paths (strings), reference one path or a non-empty list of them")
            continue
        key = (row["draft"], row["mask"], tuple(refs))
        if key in seen:
            errors.append(f"{where}: duplicates line {seen[key]} (same draft, mask and reference): remove one of them")
            continue
        seen[key] = n
        sp = row.get("split") or _split_of(row["draft"])
        if sp not in SPLITS:
            errors.append(
                f"{where}: unknown split {sp!r}: use one of {SPLITS} (or leave it out for a deterministic split)"
            )
            continue
        problems: list[str] = []  # every problem of this line, not only the first
        read = functools.partial(_read_case_file, folder, problems)
        draft = read(row["draft"], "draft")
        hw = tuple(draft.shape[-2:]) if draft is not None else None
        mimg = read(row["mask"], "mask", None)
        mask = target = None
        if mimg is not None and hw is not None:
            if tuple(mimg.size[::-1]) != hw:
                problems.append(
                    f"mask {row['mask']!r} is {mimg.size[1]}x{mimg.size[0]} but the draft is {hw[0]}x{hw[1]}: "
                    "save the mask at the draft's size"
                )
            else:
                try:
                    mask = as_mask_tensor(mimg, hw)
                except ValueError as e:
                    problems.append(f"mask {row['mask']!r}: {e}")
        if row.get("target"):
            target = read(row["target"], "target")
            if target is not None and hw is not None and tuple(target.shape[-2:]) != hw:
                problems.append(
                    f"target {row['target']!r} is {target.shape[-2]}x{target.shape[-1]} but the draft is "
                    f"{hw[0]}x{hw[1]}: the target must be the draft's size"
                )
        references = [read(r, "reference") for r in refs]
        if prompt_ok is not None and row.get("prompt") is not None and not prompt_ok(row["prompt"]):
            problems.append(
                f"prompt {row['prompt']!r} is unknown to the {preset} backbone: use one of {P.INSTRUCTIONS} "
                "(free text needs the flux-kontext preset)"
            )
        if problems:
            errors += [f"{where}: {e}" for e in problems]
            continue
        given = row.get("id")
        name = Path(row["draft"]).with_suffix("").as_posix().replace("/", "__") if given is None else given
        why = case_id_problem(name)
        if why:
            errors.append(
                f"{where}: case id {name!r} {why}"
                + ("" if given is not None else ' (from the draft\'s file name): give the line an "id"')
            )
            continue
        name = str(name)
        cases.append(
            Case(
                name,
                draft,
                references,
                mask,
                target,
                row.get("prompt"),
                sp,
                dict(
                    seed=n,
                    content=row.get("content", "user"),
                    degradation=row.get("kind", "user"),
                    split=sp,
                    source=row["draft"],
                    line=n,
                ),
            )
        )
    keys = [case_id_key(c.name) for c in cases]  # ids that name the same file on a case-insensitive disk collide
    dup = sorted({c.name for c, k in zip(cases, keys) if keys.count(k) > 1})
    if dup:
        errors.append(f'{meta}: case ids {dup[:4]} name the same output file: give those lines distinct "id"s')
    if errors:
        raise ValueError(f"{len(errors)} problem(s) in {meta}:\n  " + "\n  ".join(errors))
    if not cases:
        raise ValueError(f"{meta} holds no cases: write {CASE_FORMAT}")
    return [c for c in cases if split is None or c.split == split]


def write_cases(
    folder: str | Path,
    cases: Sequence,
    prompts: Sequence[str | None] | None = None,
    splits: Sequence[str | None] | None = None,
    outputs: Sequence[torch.Tensor | None] | None = None,
    extras: Sequence[dict] | None = None,
    append: bool = False,
) -> Path:
    """Write triplets (or Cases) as a case folder (PNG files + metadata.jsonl), e.g. to try the commands on known
    data. append=True adds them after the folder's cases (new ids; the studio saves what was tried this way);
    outputs: a refined image per case, kept as "output"; extras: more fields per line (load_cases ignores both).
    The PNGs are written first and
    metadata.jsonl is replaced atomically last, so an interrupted write never leaves a line without its files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file: give a folder for the cases")
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "metadata.jsonl"
    old = meta.read_text().splitlines() if append and meta.exists() else []
    taken = set()
    for n, line in enumerate(old, 1):
        try:
            taken.add(json.loads(line).get("id") if line.strip() else None)
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{meta} line {n} is not a JSON object ({line[:40]!r}): fix or remove it first") from None
    start = len(old)

    def png(x, rel):
        a = (to_numpy(x.clamp(0, 1)) * 255).round().astype(np.uint8)
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / rel)
        return rel

    lines = []
    for i, c in enumerate(cases):
        j = start + i
        while f"case{j:03d}" in taken:
            j += 1
        cid = f"case{j:03d}"
        refs = c.references if isinstance(c, Case) else [c.reference, *getattr(c, "extra_refs", [])]
        target = c.target
        names = [png(r, f"{cid}_ref.png" if k == 0 else f"{cid}_ref{k}.png") for k, r in enumerate(refs)]
        row = dict(
            id=cid,
            draft=png(c.draft, f"{cid}_draft.png"),
            mask=png(c.mask, f"{cid}_mask.png"),
            reference=names[0] if len(names) == 1 else names,
        )
        if target is not None:
            row["target"] = png(target, f"{cid}_target.png")
        if outputs and outputs[i] is not None:
            row["output"] = png(outputs[i], f"{cid}_output.png")
        prompt = prompts[i] if prompts else getattr(c, "prompt", None) if isinstance(c, Case) else None
        if prompt:
            row["prompt"] = prompt
        if splits and splits[i]:
            row["split"] = splits[i]
        row.update(extras[i] if extras else {})
        lines.append(json.dumps(row))
        taken.add(cid)
    atomic_save(lambda p: Path(p).write_text("\n".join(old + lines) + "\n"), meta)
    return folder
