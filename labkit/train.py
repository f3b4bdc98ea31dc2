"""The training command line (the recipes live in labkit.mini, labkit.pretrain, labkit.sft, labkit.rl; the
loop in labkit.loop):

    labkit train mini [--fresh] [--vae-minutes 35] [--editor-minutes 40]
    labkit train editor --init labkit/weights/mini --editor-lr 1e-4 ...   (the editor stage alone)
    labkit train sft --preset mini --adapter freqmole --w-freq 0.5 --out runs/sft/x [--fresh]
    labkit train sft --data DIR --out runs/sft/mine          (a case folder; per-case prompts)
    accelerate launch -m labkit.train sft ...      (N processes; --batch is per process)

A finished --out with the same settings resumes (and ends at once); other settings are refused unless
--fresh. Exit status: 2 for a usage error or bad input (nothing is written), 1 for a failed run (a
non-finite loss or gradient, naming the step).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import torch

from . import presets as P
from .data import FAILURES
from .loop import RUNS, TRACKERS, LoopConfig, check_run_folder
from .mini import train_mini
from .models import QUANTIZE, check_memory_options, load
from .sft import SFTConfig, train_sft
from .util import run_cli


def report_to_flag(parser: argparse.ArgumentParser) -> None:
    """--report-to: accelerate's experiment tracker for the run (default: tensorboard, local, no account)."""
    parser.add_argument(
        "--report-to",
        default="tensorboard",
        choices=TRACKERS,
        help="log losses, val metrics and val images through accelerate's tracker into <run>/logs "
        "(tensorboard --logdir <run>/logs); trackio and wandb need their package (wandb: an account)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The training command line; every argument is validated here, before anything is written (exit 2)."""
    ap = argparse.ArgumentParser(
        prog="labkit train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser(
        "mini",
        help="train the mini backbone (VAE, then editor) on CPU",
        description="example: labkit train mini --fresh   (about 80 min on 2 CPU cores)",
    )
    e = sub.add_parser(
        "editor",
        help="train (or continue) only the mini editor stage",
        description="example: labkit train editor --init labkit/weights/mini --editor-lr 1e-4 --editor-steps 2000 "
        "--out runs/editor/weights --run-dir runs/editor",
    )
    for q in (m, e):
        q.add_argument("--preset", default="mini", help="config to train (tiny for a quick check)")
        report_to_flag(q)
        q.add_argument("--out", default=str(P.MINI_WEIGHTS), help="where the safetensors weights and card go")
        q.add_argument("--run-dir", default=str(RUNS / "mini"), help="checkpoints and metrics CSVs (resumable)")
        q.add_argument("--vae-steps", type=int, default=3500)
        q.add_argument("--vae-minutes", type=float, default=35)
        q.add_argument("--editor-steps", type=int, default=10000)
        q.add_argument("--editor-minutes", type=float, default=42)
        q.add_argument("--bank-size", type=int, default=2048, help="pre-encoded examples per editor task (restore: 2x)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--fresh", action="store_true", help="delete earlier checkpoints of this run first")
        q.add_argument(
            "--init",
            default=None,
            help="editor stage: start from these trained weights (VAE + editor) instead of "
            "random init + the VAE in --out (a warm restart: the optimizer starts anew)",
        )
        q.add_argument(
            "--task-probs",
            type=float,
            nargs=5,
            default=None,
            help="editor task mix: reconstruct upscale denoise restore refine",
        )
        q.add_argument("--upscale", type=int, nargs="+", default=None, help="editor upscale factors drawn per example")
        q.add_argument("--editor-lr", type=float, default=1e-3, help="editor peak LR (a fine-tune from --init: 1e-4)")
        q.add_argument("--refine-bank", type=int, default=2048, help="pre-encoded refine-task examples (focus crops)")
        q.add_argument(
            "--refine-kind-probs",
            type=float,
            nargs=len(FAILURES),
            default=None,
            help=f"refine task: weight of each kind of damage, in the order {' '.join(FAILURES)} (default uniform)",
        )
        q.add_argument(
            "--region",
            choices=["none", "context", "draw"],
            default=None,
            help="refine task: how the region reaches the editor",
        )
        q.add_argument(
            "--paste-first",
            type=float,
            default=None,
            help="refine task: fraction of examples whose draft is the registered paste (refine(paste_first=True))",
        )
        q.add_argument(
            "--deform",
            type=float,
            default=None,
            help="refine task: half the aligned references also bent non-rigidly by up to this many px",
        )
        for flag, what in (
            ("identity", "a start that is already right (it must come back unchanged)"),
            ("unaligned", "a reference at another scale and pose, cropped around the region (Refine-by-Align)"),
            ("objects", "an object on its own as the reference (labkit.objects, seen appearance families)"),
        ):
            q.add_argument(f"--{flag}", type=float, default=None, help=f"refine task: fraction of examples with {what}")
        q.add_argument(
            "--eval-every",
            type=int,
            default=500,
            help="editor: steps between validation evals (and the copy-skill curve)",
        )
    m.add_argument("--stage", choices=["all", "vae", "editor"], default="all")
    s = sub.add_parser(
        "sft",
        help="fine-tune adapters (FreqMoLE / LoRA) on draft + reference -> target",
        description="example: labkit train sft --adapter freqmole --w-freq 0.5 --out runs/sft/x   "
        "(a case folder: --data DIR; N processes: accelerate launch -m labkit train sft ...)",
    )
    s.add_argument("--preset", default="mini")
    s.add_argument("--out", default=str(RUNS / "sft"), help="checkpoints, metrics.csv and the adapter")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--ema", type=float, default=0.0, help="EMA decay of the adapter weights (0 = off)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--mixed-precision",
        default="auto",
        choices=["auto", "no", "bf16", "fp16"],
        help="autocast of the forward (auto: bf16 on CUDA or a CPU with native bf16)",
    )
    s.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in the backward (default: on for a flux-kontext / pipeline preset, off otherwise)",
    )
    s.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help="QLoRA-style: the frozen transformer quantized (torchao int8/float8 weight-only, bitsandbytes nf4 on "
        "CUDA; a pipeline preset only); the adapters train in fp32",
    )
    s.add_argument(
        "--fsdp",
        action="store_true",
        help="under accelerate launch: shard the frozen transformer (FSDP2, its blocks "
        "as units) across the processes; the adapter trains, rank 0 saves it whole",
    )
    s.add_argument("--fresh", action="store_true", help="start over in --out instead of resuming the run there")
    report_to_flag(s)
    for f_ in fields(SFTConfig):
        names = [f"--{f_.name.replace('_', '-')}"] + (["--data"] if f_.name == "data_dir" else [])
        s.add_argument(
            *names,
            dest=f_.name,
            type=type(f_.default),
            default=f_.default,
            help="a case folder (metadata.jsonl): its train split, validated on its val split"
            if f_.name == "data_dir"
            else None,
        )
    args = ap.parse_args(argv)
    try:
        P.check_preset(args.preset)
        if args.cmd == "sft":
            args.loop = LoopConfig(
                steps=args.steps,
                lr=args.lr,
                warmup=min(50, max(0, args.steps) // 10 + 1),
                ckpt_every=100,
                eval_every=max(1, args.steps // 4),
                seed=args.seed,
                out_dir=args.out,
                ema=args.ema,
                mixed_precision=args.mixed_precision,
                gradient_checkpointing=(
                    P.get(args.preset).text == "t5clip"
                    if args.gradient_checkpointing is None
                    else args.gradient_checkpointing
                ),
                fresh=args.fresh,
                fsdp=args.fsdp,
                report_to=args.report_to,
            ).check()
            SFTConfig(**{f_.name: getattr(args, f_.name) for f_ in fields(SFTConfig)}).check()
            check_memory_options(
                P.get(args.preset), "cuda" if torch.cuda.is_available() else "cpu", args.quantize, "none", None
            )
        else:
            if P.get(args.preset).name not in ("tiny", "mini"):
                raise ValueError(
                    f"labkit train {args.cmd} trains labkit's own small backbones (tiny, mini) from scratch; "
                    f"{args.preset!r} is a real/pipeline model: fine-tune adapters on it with "
                    f"`labkit train sft --preset {args.preset}`"
                )
            for k in ("vae_steps", "editor_steps", "bank_size", "refine_bank", "eval_every"):
                if getattr(args, k) < 1:
                    raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
            LoopConfig(lr=args.editor_lr).check()
            for k in ("task_probs", "refine_kind_probs"):
                v = getattr(args, k)
                if v and (min(v) < 0 or not sum(v) > 0):
                    raise ValueError(f"--{k.replace('_', '-')} must be >= 0 with a positive sum, got {v}")
    except ValueError as e:
        ap.error(str(e))  # usage error: exit 2, nothing written
    if args.cmd == "editor":
        args.stage = "editor"
    return args


def main(argv: list[str] | None = None) -> int:
    """`labkit train {mini,editor,sft} ...`: 0 done, 1 a failed run (NaN), 2 usage or bad input."""
    args = parse_args(argv)

    def body():
        if args.cmd in ("mini", "editor"):
            train_mini(args)
        else:
            check_run_folder(args.out)  # a folder labkit did not write is refused before the data loads
            cfg = SFTConfig(**{f_.name: getattr(args, f_.name) for f_ in fields(SFTConfig)})
            train_sft(load(args.preset, quantize=args.quantize), args.loop, cfg, free_text_encoders=True)

    where = args.out if args.cmd == "sft" else args.run_dir
    return run_cli(
        "labkit train", body, kept=f"the last checkpoint in {where} is kept; the same command resumes from it"
    )


if __name__ == "__main__":
    sys.exit(main())
