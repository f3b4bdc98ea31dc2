"""The training command line (the recipes live in labkit.mini, labkit.editor, labkit.sft, labkit.rl; the
loop in labkit.loop):

    python -m labkit.train mini [--fresh] [--vae-minutes 35] [--editor-minutes 40]
    python -m labkit.train sft --preset mini --adapter freqmole --w-freq 0.5 --out runs/sft/x [--fresh]
    python -m labkit.train sft --data DIR --out runs/sft/mine          (a case folder; per-case prompts)
    accelerate launch -m labkit.train sft ...      (N processes; --batch is per process)

A finished --out with the same settings resumes (and ends at once); other settings are refused unless
--fresh. A non-finite loss or gradient stops with exit status 1 and an error naming the step.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from . import presets as P
from .loop import RUNS, LoopConfig, NonFiniteError, RunConfigMismatch


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m labkit.train mini [--fresh] ...`."""
    from .sft import SFTConfig, train_sft
    ap = argparse.ArgumentParser(prog="labkit.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mini", help="train the mini backbone (VAE, then editor) on CPU")
    m.add_argument("--preset", default="mini", help="config to train (tiny for a quick check)")
    m.add_argument("--out", default=str(P.MINI_WEIGHTS), help="where the safetensors weights and card go")
    m.add_argument("--run-dir", default=str(RUNS / "mini"), help="checkpoints and metrics CSVs (resumable)")
    m.add_argument("--vae-steps", type=int, default=3500)
    m.add_argument("--vae-minutes", type=float, default=35)
    m.add_argument("--editor-steps", type=int, default=10000)
    m.add_argument("--editor-minutes", type=float, default=42)
    m.add_argument("--bank-size", type=int, default=2048, help="pre-encoded examples per editor task (restore: 2x)")
    m.add_argument("--stage", choices=["all", "vae", "editor"], default="all")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--fresh", action="store_true", help="delete earlier checkpoints of this run first")
    m.add_argument("--init", default=None, help="editor stage: start from these trained weights (VAE + editor) instead of "
                                                "random init + the VAE in --out (probes: more steps on one task)")
    m.add_argument("--task-probs", type=float, nargs=4, default=None, help="editor task mix: reconstruct upscale denoise restore")
    m.add_argument("--upscale", type=int, nargs="+", default=None, help="editor upscale factors drawn per example")
    s = sub.add_parser("sft", help="fine-tune adapters (FreqMoLE / LoRA) on LRGI + HRRI -> HRGT triplets")
    s.add_argument("--preset", default="mini")
    s.add_argument("--out", default=str(RUNS / "sft"), help="checkpoints, metrics.csv and the adapter")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--ema", type=float, default=0.0, help="EMA decay of the adapter weights (0 = off)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast of the forward (auto: bf16 on CUDA or a CPU with native bf16)")
    s.add_argument("--gradient-checkpointing", action="store_true")
    s.add_argument("--fresh", action="store_true", help="start over in --out instead of resuming the run there")
    for f_ in fields(SFTConfig):
        names = [f"--{f_.name.replace('_', '-')}"] + (["--data"] if f_.name == "data_dir" else [])
        s.add_argument(*names, dest=f_.name, type=type(f_.default), default=f_.default,
                       help="a case folder (metadata.jsonl): its train split, validated on its val split" if f_.name == "data_dir" else None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "mini":
            from .mini import train_mini
            train_mini(args)
        elif args.cmd == "sft":
            from .models import load
            bb = load(args.preset)
            cfg = SFTConfig(**{f_.name: getattr(args, f_.name) for f_ in fields(SFTConfig)})
            loop = LoopConfig(steps=args.steps, lr=args.lr, warmup=min(50, args.steps // 10 + 1), ckpt_every=100,
                              eval_every=max(1, args.steps // 4), seed=args.seed, out_dir=args.out, ema=args.ema,
                              mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                              fresh=args.fresh)
            train_sft(bb, loop, cfg)
    except (NonFiniteError, RunConfigMismatch, ValueError, FileNotFoundError) as e:
        print(f"labkit.train: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
