"""The one command: `labkit {refine,evaluate,train,sweep} ...` (also `python -m labkit ...`).

    labkit refine ...                        refine one image or a case folder (below)
    labkit evaluate --data DIR --out OUT     notebook 05's tables + claims on a case folder
    labkit train {mini,editor,sft} ...       the training recipes (labkit.train)
    labkit sweep {figures,grid} ...          papermill: every notebook into figures/, or a parameter grid

Every subcommand has --help with an example. Exit status everywhere: 0 done, 2 a usage error or bad input
(what is wrong and the fix; nothing half-written), 1 a failed run, 130 interrupted (one line: what was kept).

The refine subcommand (the Python API is `labkit.refine(...)`, labkit.inference):

    labkit refine DRAFT MASK [REFERENCE ...] -o OUT.png [--prompt P] [--method focus] [--adapter A]
                  [--preset mini] [--steps N] [--seed S] [--resolution 512] [--quantize int8] [--offload model]
    labkit refine --data DIR --out OUTDIR [--split test] [--fresh] [...]   a case folder (metadata.jsonl)

A folder run validates every case first (files, sizes, prompts), records its settings in OUTDIR/run.json,
shows a progress bar, writes OUTDIR/<case>.png atomically and skips cases already written, so an
interrupted run resumes; other settings on the same OUTDIR are refused (naming the difference and --fresh).
Exit status: 2 for a usage error or bad input, 1 for a failed run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from . import evaluate, sweep, train
from . import inference as I
from .cases import load_cases
from .focus import REGION_ENCODINGS
from .images import read_image
from .models import OFFLOAD, QUANTIZE, check_memory_options, memory_options
from .presets import check_preset, get
from .util import atomic_save, check_not_an_input, check_writable, claim_out_dir, run_cli, write_json

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}  # fmt: skip


def image_format(path: str | Path) -> str:
    """The PIL format an output path's extension names; an extension PIL is not asked to write is refused."""
    ext = Path(path).suffix.lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"-o {path}: unknown image extension {ext!r}; use one of {sorted(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[ext]


def save_image(img, path: Path) -> Path:
    """A PIL image to path in the format its extension names, atomically."""
    fmt = image_format(path)
    return atomic_save(lambda p: img.save(p, format=fmt), path)


def add_option_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per field of inference.RefineOptions, its help from the field (switches as --x / --no-x; unset: the
    option's default, the val winner)."""
    choices = dict(method=list(I.METHODS), region=list(REGION_ENCODINGS))
    for f in fields(I.RefineOptions):
        flag, what = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            ap.add_argument(
                flag, default=None, action=argparse.BooleanOptionalAction, help=f"{what} (default: {f.default})"
            )
        else:
            kind = {"float": float, "int": int}.get(f.type.split(" ")[0], str)
            ap.add_argument(flag, type=kind, default=f.default, choices=choices.get(f.name), help=f"{what}")


def parse_refine(argv: list[str] | None = None) -> argparse.Namespace:
    """The refine command line (usage errors exit 2 before any work)."""
    ap = argparse.ArgumentParser(
        prog="labkit refine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: labkit refine draft.png mask.png ref.png -o out.png --method focus",
    )
    ap.add_argument("draft", nargs="?", help="the generated image to refine")
    ap.add_argument("mask", nargs="?", help="the region to refine (any non-black pixel, or an alpha channel)")
    ap.add_argument("references", nargs="*", help="reference image(s) showing the right detail (none: reference-free)")
    ap.add_argument("-o", "--output", help="output image (one case)")
    ap.add_argument("--data", help="a case folder with metadata.jsonl (every case; see --split)")
    ap.add_argument(
        "--out", help="output folder for --data (its run.json records the settings: the same settings resume)"
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="--data: start over in --out (only a folder labkit wrote: one with its run.json)",
    )
    ap.add_argument("--split", choices=["train", "val", "test"], help="--data: only this split")
    add_option_flags(ap)
    for flag, options, what in [
        ("--quantize", QUANTIZE, "a pipeline folder: the frozen transformer's weights (torchao / bitsandbytes)"),
        ("--offload", OFFLOAD, "a pipeline folder on CUDA: diffusers' CPU offload of its components"),
    ]:
        ap.add_argument(flag, choices=options, default="none", help=what)
    a = ap.parse_args(argv)
    if a.data and (a.draft or a.output):
        ap.error("give either DRAFT MASK [REFERENCE ...] -o OUT, or --data DIR --out OUTDIR")
    if not a.data and not (a.draft and a.mask and a.output):
        ap.error("one case needs DRAFT MASK [REFERENCE ...] -o OUT (or use --data DIR --out OUTDIR)")
    if a.data and not a.out:
        ap.error("--data needs --out OUTDIR")
    if a.steps is not None and a.steps < 1:
        ap.error(f"--steps must be >= 1, got {a.steps}")
    if not 0 < a.strength <= 1:
        ap.error(f"--strength must be in (0, 1], got {a.strength}")
    try:
        check_preset(a.preset)
    except ValueError as e:
        ap.error(str(e))
    return a


def refine_main(argv: list[str] | None = None) -> int:
    """`labkit refine ...`: 0 done, 2 usage or bad input (naming the file and the fix), 1 a failed run."""
    a = parse_refine(argv)
    kw = {f.name: getattr(a, f.name) for f in fields(I.RefineOptions) if f.name != "prompt"}  # a case's prompt wins
    try:  # every option checked before anything is read or written (a bad --seed, --device, --steps ...)
        o = I.RefineOptions(**kw).checked()
        check_memory_options(get(o.preset), o.device, a.quantize, a.offload, None)
        memory_options(a.quantize, a.offload)  # every load of the pipeline in this run
    except ValueError as e:
        print(f"labkit refine: error: {e}", file=sys.stderr)
        return 2

    def one():
        check_not_an_input(a.output, [a.draft, a.mask, *a.references], "-o")
        image_format(a.output)
        check_writable(a.output, "-o")
        imgs = [
            read_image(a.draft, "draft"),
            read_image(a.mask, "mask"),
            *[read_image(r, "reference") for r in a.references],
        ]
        out = I.refine(imgs[0], imgs[1], imgs[2:] or None, prompt=a.prompt, **kw)
        save_image(out, Path(a.output))
        print(f"wrote {a.output}")

    def folder():
        cases = load_cases(a.data, a.split, preset=a.preset)  # every case (files, sizes, prompts) validated first
        out_dir = Path(a.out)
        settings = dict(kw, data=str(Path(a.data).resolve()), split=a.split, prompt=a.prompt)
        claim_out_dir(out_dir, settings, a.fresh, inputs=[a.data])
        write_json(settings, out_dir / "run.json")
        todo = [c for c in cases if not (out_dir / f"{c.name}.png").exists()]
        print(f"{len(cases)} cases, {len(cases) - len(todo)} already done in {out_dir}")
        for c in tqdm(todo, desc="refine"):
            img = I.refine(c.draft, c.mask, c.references, prompt=c.prompt or a.prompt, **kw)
            save_image(img, out_dir / f"{c.name}.png")

    kept = f"the outputs written to {a.out} are kept; the same command resumes" if a.data else "nothing was written"
    return run_cli("labkit refine", folder if a.data else one, kept)


def main(argv: list[str] | None = None) -> int:
    """`labkit SUBCOMMAND ...`: dispatch to the subcommand's own parser (each has --help)."""
    commands = {"refine": refine_main, "evaluate": evaluate.main, "train": train.main, "sweep": sweep.main}
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"labkit: error: unknown command {argv[0]!r}; choose from {sorted(commands)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
