"""The mini backbone: train the VAE (labkit.vae), then the Kontext-style editor (labkit.pretrain), on CPU; write
safetensors weights and the card (what each stage got: budget, curve, held-out numbers). `labkit train mini`."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import models as M
from . import presets as P
from .loop import LoopConfig
from .pretrain import EditorConfig, evaluate, evaluate_refine, train_editor
from .results import git_commit, versions
from .util import RunConfigMismatch, atomic_save, labkit_wrote, write_json
from .vae import VAEConfig, train_vae

# ------------------------------------------------------------------------------------------------
# both stages, the card


def weights_hash(folder: str | Path) -> dict[str, str]:
    """sha256 of each safetensors file in a weights folder (the card records these)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*.safetensors"))}


def train_mini(args) -> Path:
    """Stage 1 VAE, stage 2 editor; each resumable from <run_dir>/<stage>/ckpt/."""
    run = Path(args.run_dir)
    if args.fresh and run.exists():  # every stage starts over (the loop's own `fresh` covers one run folder)
        if any(run.iterdir()) and not any(labkit_wrote(p) for p in (run, run / "vae", run / "editor")):
            raise RunConfigMismatch(f"--fresh replaces only labkit's run folders; {run} is not one: choose another")
        shutil.rmtree(run)
    preset = P.get(args.preset, weights=None)
    bb = M.build(preset)
    card = dict(
        preset=preset.name,
        transformer_config=preset.transformer,
        vae_config=preset.vae,
        seed=args.seed,
        git=git_commit(),
        versions=versions(),
        stages={},
    )
    t0 = time.time()
    vae_loop = LoopConfig(
        steps=args.vae_steps,
        lr=3e-3,
        warmup=100,
        clip=1.0,
        ckpt_every=250,
        eval_every=500,
        max_minutes=args.vae_minutes,
        seed=args.seed,
        out_dir=str(run / "vae"),
        report_to=getattr(args, "report_to", "none"),
    )
    if args.stage in ("all", "vae"):
        st = train_vae(bb, vae_loop, VAEConfig())
        card["stages"]["vae"] = dict(
            loop=asdict(vae_loop),
            recipe=asdict(VAEConfig()),
            steps=st["step"],
            seconds=st["seconds"],
            evals=st["evals"],
            latent_stats=dict(scaling_factor=bb.vae.config.scaling_factor, shift_factor=bb.vae.config.shift_factor),
        )
        M.save_weights(bb, args.out, card)
    elif args.init:
        M.load_weights(bb, args.init)  # continue from trained weights (the VAE stays frozen)
    else:
        M.load_weights(bb, args.out, parts=("vae",))
    if args.stage in ("all", "editor"):
        ed_loop = LoopConfig(
            steps=args.editor_steps,
            lr=args.editor_lr,
            warmup=100,
            clip=1.0,
            ckpt_every=250,
            eval_every=args.eval_every,
            max_minutes=args.editor_minutes,
            seed=args.seed,
            out_dir=str(run / "editor"),
            mixed_precision="no",
            report_to=getattr(args, "report_to", "none"),
        )  # fp32 on every CPU: the weights do not depend on the machine
        over = dict(
            task_probs=args.task_probs,
            upscale=args.upscale,  # CLI overrides of the recipe (probes)
            refine_kind_probs=args.refine_kind_probs,
        )
        scalars = dict(region=args.region, paste_first=args.paste_first, deform=args.deform)
        scalars |= {k: getattr(args, k, None) for k in ("identity", "unaligned", "objects")}
        ecfg = EditorConfig(
            **{k: tuple(v) for k, v in over.items() if v}, **{k: v for k, v in scalars.items() if v is not None}
        )
        st = train_editor(bb, ed_loop, ecfg, bank_size=args.bank_size, refine_bank=args.refine_bank)
        prev = _read_card(args.out)
        card["stages"] = {**prev.get("stages", {}), **card["stages"]}
        card["stages"]["editor"] = dict(
            loop=asdict(ed_loop),
            recipe=asdict(ecfg),
            bank_size=args.bank_size,
            steps=st["step"],
            seconds=st["seconds"],
            evals=st["evals"],
            heldout=editor_heldout(bb),
            init=args.init,
            warm_restart=bool(args.init),  # --init: weights kept, optimizer new
            refine_bank=args.refine_bank,
        )
    card["wall_seconds_this_run"] = time.time() - t0
    M.save_weights(bb, args.out, card)
    card["sha256"] = weights_hash(args.out)
    write_json(card, Path(args.out) / "card.json")
    write_card_md(card, Path(args.out) / "CARD.md")
    return Path(args.out)


def editor_heldout(bb, n: int = 16, steps: int = 8) -> dict:
    """The editor on held-out (val) examples of each pretraining task vs its no-model baselines (PSNR, dB)."""
    keep = (
        "editor_psnr",
        "input_psnr",
        "vae_ceiling_psnr",
        "vae_input_psnr",
        "editor_region_psnr",
        "input_region_psnr",
        "vae_input_region_psnr",
        "oracle_region_psnr",
        "editor_wrong_ref_region_psnr",
        "ref_gain_region_db",
        "editor_region_psnr_strong",
        "input_region_psnr_strong",
        "editor_wrong_ref_region_psnr_strong",
    )
    return {
        task: {k: round(v, 3) for k, v in r.items() if k in keep}
        for task, r in evaluate(bb, n=n, steps=steps, split="val")["metrics"].items()
    }


def _read_card(folder) -> dict:
    p = Path(folder) / "card.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write_card_md(card: dict, path: Path) -> None:
    """A human-readable model card next to the JSON one."""
    lines = [
        f"# labkit `{card['preset']}` backbone",
        "",
        "Trained by `make mini` (python -m labkit.train mini) on CPU from the images in labkit.data "
        "(train split; see the README's data card). Numbers below are held-out (val split).",
        "",
    ]
    for name, st in card["stages"].items():
        ev = st["evals"][-1] if st.get("evals") else {}
        lines += [
            f"## {name}",
            f"- steps: {st['steps']}, wall time: {st['seconds'] / 60:.1f} min",
            *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in ev.items()],
            "",
        ]
        if st.get("heldout"):  # editor vs no-model baselines, held-out PSNR (dB)
            cols = list(dict.fromkeys(k for r in st["heldout"].values() for k in r))
            lines += [
                "| task | " + " | ".join(cols) + " |",
                "|---" * (len(cols) + 1) + "|",
                *[
                    f"| {t} | " + " | ".join(f"{r[c]:.2f}" if c in r else "" for c in cols) + " |"
                    for t, r in st["heldout"].items()
                ],
                "",
            ]
    if card.get("tried"):  # continued runs that were measured and not kept (their budgets, and why)
        lines += ["## Tried, not kept", ""]
        lines += [f"- `{k}`: {t.get('steps')} steps, {t.get('why', '')}" for k, t in card["tried"].items()] + [""]
    lines += ["## sha256", *[f"- {k}: `{v}`" for k, v in card.get("sha256", {}).items()], ""]
    path.write_text("\n".join(lines))


def load_checkpoint_weights(bb: M.Backbone, ckpt: str | Path) -> M.Backbone:
    """The trained weights of a loop checkpoint (ckpt/trainable.safetensors: transformer + text) into bb."""
    named = dict(bb.named_parameters())
    sd = load_file(str(Path(ckpt) / "trainable.safetensors"))
    missing = [k for k in sd if k not in named]
    if missing:
        raise ValueError(f"{ckpt} holds weights this backbone lacks ({missing[:3]}): another preset?")
    with torch.no_grad():
        for k, v in sd.items():
            named[k].copy_(v)
    return bb


def compare_region_encodings(
    checkpoints: dict[str, str], preset: str = "mini", n: int = 48, steps: int = 8, seed: int = 0, split: str = "val"
) -> dict:
    """Region encodings after the same training budget: each checkpoint (name = its encoding) scored by
    pretrain.evaluate_refine on `split` with the target and with an aligned reference; per kind and overall."""
    out = {}
    for region, ckpt in checkpoints.items():
        bb = load_checkpoint_weights(M.load(preset), ckpt)
        step = json.loads((Path(ckpt) / "loop_state.json").read_text())["step"]
        out[region] = dict(step=step, checkpoint=str(ckpt))
        for ref in ("target", "aligned"):
            r = evaluate_refine(
                bb, n=n, steps=steps, seed=seed, split=split, reference=ref, cfg=EditorConfig(region=region)
            )
            out[region][ref] = dict(
                summary=r["summary"],
                by_kind={k: {c: round(v, 3) for c, v in d.items()} for k, d in r["by_kind"].items()},
            )
    return out


def install_editor(
    run_weights: str | Path, into: str | Path = P.MINI_WEIGHTS, stage: str = "editor_refine", **extra
) -> Path:
    """Commit a continued editor (a `labkit train editor --init` run) into a weights folder: its safetensors, and
    its card stage appended as `stage` to the folder's card (the earlier stages - VAE, editor pretraining - kept,
    so the card records the whole budget the weights got); extra: more numbers for that stage."""
    run_weights, into = Path(run_weights), Path(into)
    new, card = _read_card(run_weights), _read_card(into)
    card.setdefault("stages", {})[stage] = {**new["stages"]["editor"], **extra}
    for f in ("transformer.safetensors", "text.safetensors", "vae.safetensors", "latent_stats.json"):
        src = (run_weights / f).read_bytes()
        atomic_save(lambda p, b=src: Path(p).write_bytes(b), into / f)
    card["sha256"] = weights_hash(into)
    write_json(card, into / "card.json")
    write_card_md(card, into / "CARD.md")
    return into
