"""The refine command line (the Python API is `labkit.refine(...)`, labkit.inference):

    python -m labkit.refine DRAFT MASK [REFERENCE ...] -o OUT.png [--prompt P] [--method focus] [--adapter A]
                            [--preset mini] [--steps N] [--seed S]
    python -m labkit.refine --data DIR --out OUTDIR [--split test] [...]   a case folder (metadata.jsonl)

A folder run validates every case first, shows a progress bar, writes OUTDIR/<case>.png atomically and
skips cases already written, so an interrupted run resumes. Bad input exits non-zero with what is wrong.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path


class _CallableModule(types.ModuleType):
    """`import labkit.refine` binds this module over the `labkit.refine` function: calling it still refines."""

    def __call__(self, *args, **kw):
        from .inference import refine
        return refine(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule


def save_image(img, path: Path) -> Path:
    """A PIL image to path (format from the extension, PNG by default), atomically."""
    from .util import atomic_save
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    return atomic_save(lambda p: img.save(p, format=fmt), path)


def main(argv: list[str] | None = None) -> int:
    from .inference import METHODS
    ap = argparse.ArgumentParser(prog="labkit.refine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("draft", nargs="?", help="the generated image to refine")
    ap.add_argument("mask", nargs="?", help="the region to refine (white / 1 = refine)")
    ap.add_argument("references", nargs="*", help="reference image(s) showing the right detail (none: reference-free)")
    ap.add_argument("-o", "--output", help="output image (one case)")
    ap.add_argument("--data", help="a case folder with metadata.jsonl (every case; see --split)")
    ap.add_argument("--out", help="output folder for --data")
    ap.add_argument("--split", choices=["train", "val", "test"], help="--data: only this split")
    ap.add_argument("--method", default="focus", choices=METHODS)
    ap.add_argument("--adapter", default=None, help="adapter folder or committed name (default: the frozen editor)")
    ap.add_argument("--prompt", default=None, help="instruction / free text (default: the editor's; a case's own prompt wins)")
    ap.add_argument("--preset", default="mini", help="tiny | mini | flux-kontext | a FluxKontextPipeline folder")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.data and (a.draft or a.output):
        ap.error("give either DRAFT MASK [REFERENCE ...] -o OUT, or --data DIR --out OUTDIR")
    if not a.data and not (a.draft and a.mask and a.output):
        ap.error("one case needs DRAFT MASK [REFERENCE ...] -o OUT (or use --data DIR --out OUTDIR)")
    if a.data and not a.out:
        ap.error("--data needs --out OUTDIR")
    from PIL import Image

    from . import inference as I
    from .data import load_cases
    kw = dict(method=a.method, adapter=a.adapter, steps=a.steps, seed=a.seed, preset=a.preset, device=a.device)
    try:
        if not a.data:
            for p in [a.draft, a.mask, *a.references]:
                if not Path(p).exists():
                    raise FileNotFoundError(f"no such file: {p}")
            out = I.refine(Image.open(a.draft), Image.open(a.mask), [Image.open(r) for r in a.references] or None, prompt=a.prompt, **kw)
            save_image(out, Path(a.output))
            print(f"wrote {a.output}")
            return 0
        from tqdm.auto import tqdm
        cases = load_cases(a.data, a.split)  # every case validated before any work starts
        out_dir = Path(a.out)
        todo = [c for c in cases if not (out_dir / f"{c.name}.png").exists()]
        print(f"{len(cases)} cases, {len(cases) - len(todo)} already done in {out_dir}")
        for c in tqdm(todo, desc="refine"):
            img = I.refine(c.draft, c.mask, c.references, prompt=c.prompt or a.prompt, **kw)
            save_image(img, out_dir / f"{c.name}.png")
        return 0
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"labkit.refine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
