"""The mini backbone recipe: train the VAE, then the Kontext-style editor, on CPU; write weights + card."""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from . import models as M
from . import presets as P
from .train import LoopConfig, VAEConfig, train_vae
from .util import git_commit, versions, write_json


def weights_hash(folder: str | Path) -> dict[str, str]:
    """sha256 of each safetensors file in a weights folder (the card records these)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*.safetensors"))}


def train_mini(args) -> Path:
    """Stage 1 VAE, stage 2 editor; each resumable from runs/<name>/<stage>/ckpt.pt."""
    run = Path(args.run_dir)
    if args.fresh and run.exists():
        shutil.rmtree(run)
    preset = P.get(args.preset, weights=None)
    bb = M.build(preset)
    card = dict(preset=preset.name, transformer_config=preset.transformer, vae_config=preset.vae, seed=args.seed,
                git=git_commit(), versions=versions(), stages={})
    t0 = time.time()
    vae_loop = LoopConfig(steps=args.vae_steps, lr=3e-3, warmup=100, clip=1.0, ckpt_every=250, eval_every=500,
                          max_minutes=args.vae_minutes, seed=args.seed, out_dir=str(run / "vae"))
    if args.stage in ("all", "vae"):
        st = train_vae(bb, vae_loop, VAEConfig())
        card["stages"]["vae"] = dict(loop=asdict(vae_loop), recipe=asdict(VAEConfig()), steps=st["step"],
                                     seconds=st["seconds"], evals=st["evals"],
                                     latent_stats=dict(scaling_factor=bb.vae.config.scaling_factor,
                                                       shift_factor=bb.vae.config.shift_factor))
        M.save_weights(bb, args.out, card)
    elif args.init:
        M.load_weights(bb, args.init)  # continue from trained weights (the VAE stays frozen)
    else:
        M.load_weights(bb, args.out, parts=("vae",))
    if args.stage in ("all", "editor"):
        from .editor import EditorConfig, train_editor
        ed_loop = LoopConfig(steps=args.editor_steps, lr=1e-3, warmup=100, clip=1.0, ckpt_every=250, eval_every=500,
                             max_minutes=args.editor_minutes, seed=args.seed, out_dir=str(run / "editor"))
        over = dict(task_probs=args.task_probs, upscale=args.upscale)  # CLI overrides of the recipe (probes)
        ecfg = EditorConfig(**{k: tuple(v) for k, v in over.items() if v})
        st = train_editor(bb, ed_loop, ecfg, bank_size=args.bank_size)
        prev = _read_card(args.out)
        card["stages"] = {**prev.get("stages", {}), **card["stages"]}
        card["stages"]["editor"] = dict(loop=asdict(ed_loop), recipe=asdict(ecfg), bank_size=args.bank_size, steps=st["step"],
                                        seconds=st["seconds"], evals=st["evals"], heldout=editor_heldout(bb),
                                        init=args.init)
    card["wall_seconds_this_run"] = time.time() - t0
    M.save_weights(bb, args.out, card)
    card["sha256"] = weights_hash(args.out)
    write_json(card, Path(args.out) / "card.json")
    write_card_md(card, Path(args.out) / "CARD.md")
    return Path(args.out)


def editor_heldout(bb, n: int = 16, steps: int = 8) -> dict:
    """The editor on held-out (val) examples of each pretraining task vs its no-model baselines (PSNR, dB)."""
    from .editor import evaluate
    keep = ("editor_psnr", "input_psnr", "vae_ceiling_psnr", "vae_input_psnr", "editor_region_psnr", "input_region_psnr",
            "vae_input_region_psnr", "oracle_region_psnr", "editor_wrong_ref_region_psnr", "ref_gain_region_db",
            "editor_region_psnr_strong", "input_region_psnr_strong", "editor_wrong_ref_region_psnr_strong")
    return {task: {k: round(v, 3) for k, v in r.items() if k in keep}
            for task, r in evaluate(bb, n=n, steps=steps, split="val")["metrics"].items()}


def add_heldout(folder: str | Path = P.MINI_WEIGHTS) -> dict:
    """Recompute the card's held-out editor numbers for committed weights (no retraining); sha256 unchanged."""
    card = _read_card(folder)
    bb = M.build(P.get(card["preset"], weights=None))
    M.load_weights(bb, folder)
    card["stages"]["editor"]["heldout"] = editor_heldout(bb)
    write_json(card, Path(folder) / "card.json")
    write_card_md(card, Path(folder) / "CARD.md")
    return card


def _read_card(folder) -> dict:
    import json
    p = Path(folder) / "card.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write_card_md(card: dict, path: Path) -> None:
    """A human-readable model card next to the JSON one."""
    lines = [f"# labkit `{card['preset']}` backbone", "",
             "Trained by `make mini` (python -m labkit.train mini) on CPU from the images in labkit.data "
             "(train split; see the README's data card). Numbers below are held-out (val split).", ""]
    for name, st in card["stages"].items():
        ev = st["evals"][-1] if st.get("evals") else {}
        lines += [f"## {name}", f"- steps: {st['steps']}, wall time: {st['seconds'] / 60:.1f} min",
                  *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in ev.items()], ""]
        if st.get("heldout"):  # editor vs no-model baselines, held-out PSNR (dB)
            cols = list(dict.fromkeys(k for r in st["heldout"].values() for k in r))
            lines += ["| task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                      *[f"| {t} | " + " | ".join(f"{r[c]:.2f}" if c in r else "" for c in cols) + " |" for t, r in st["heldout"].items()], ""]
    lines += ["## sha256", *[f"- {k}: `{v}`" for k, v in card.get("sha256", {}).items()], ""]
    path.write_text("\n".join(lines))
