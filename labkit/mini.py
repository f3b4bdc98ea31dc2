"""The mini backbone recipe: train the VAE (here), then the Kontext-style editor (labkit.pretrain), on CPU;
write safetensors weights + card. Both stages are recipes on labkit.loop."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import data as D
from . import models as M
from . import presets as P
from .loop import LoopConfig, Step, run_loop
from .results import git_commit, versions
from .util import atomic_save, write_json


# ------------------------------------------------------------------------------------------------
# stage 1: the VAE
@dataclass
class VAEConfig:
    """The mini VAE recipe (measured on 2 CPU cores) plus a PCA warm start."""

    crop: int = 48
    batch: int = 16
    text_frac: float = 0.35
    kl: float = 1e-6
    pca_warm: float = 0.3  # fraction of steps with the auxiliary 'match an 8x8-patch PCA code' loss
    eval_size: int = 128
    eval_n: int = 24


def patch_pca(images: torch.Tensor, factor: int = 8, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and top-k basis (D, k) of the factor×factor×3 patches of images (B, 3, H, W)."""
    x = rearrange(images, "b c (h p) (w q) -> (b h w) (c p q)", p=factor, q=factor)
    mu = x.mean(0)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    return mu, v[:k].T


def pca_code(images: torch.Tensor, mu: torch.Tensor, basis: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(B, 3, H, W) -> (B, k, H/f, W/f) patch-PCA coefficients."""
    h = images.shape[-2] // factor
    x = rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=factor, q=factor)
    return rearrange((x - mu) @ basis, "b (h w) k -> b k h w", h=h)


class VAEStep(nn.Module):
    """The VAE's training forward as one module (so the loop can prepare it): latents, reconstruction, KL,
    and optionally the decoder's output for a given PCA code (the warm start)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, code: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        post = self.vae.encode(x * 2 - 1).latent_dist
        z = post.mode()
        out = dict(z=z, rec=(self.vae.decode(z).sample + 1) / 2, kl=post.kl().mean() / x[0].numel())
        if code is not None:
            out["code_rec"] = (self.vae.decode(code.to(z.dtype)).sample + 1) / 2
        return out


def vae_eval(bb: M.Backbone, images: torch.Tensor, labels: list[str]) -> dict:
    """Held-out PSNR/SSIM of the VAE round trip vs bicubic x8 on the same images."""
    from .metrics import psnr, ssim

    rec = torch.cat([bb.vae.decode(bb.vae.encode(x[None] * 2 - 1).latent_dist.mode()).sample for x in images])
    rec = ((rec + 1) / 2).clamp(0, 1).float()
    bic = D.bicubic_draft(images, bb.preset.vae_factor)
    out = dict(
        vae_psnr=psnr(rec, images).mean().item(),
        bicubic_psnr=psnr(bic, images).mean().item(),
        vae_ssim=ssim(rec, images).mean().item(),
        bicubic_ssim=ssim(bic, images).mean().item(),
    )
    for kind in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == kind]
        out[f"vae_psnr_{kind}"] = psnr(rec[idx], images[idx]).mean().item()
        out[f"bicubic_psnr_{kind}"] = psnr(bic[idx], images[idx]).mean().item()
    return out


def train_vae(bb: M.Backbone, loop: LoopConfig, cfg: VAEConfig) -> dict:
    """Train the backbone's AutoencoderKL (L1 + MSE + KL, PCA warm start); set scaling/shift from latents."""
    vae = bb.vae.requires_grad_(True)
    f = bb.preset.vae_factor
    mu, basis = patch_pca(
        D.crop_batch(np.random.default_rng(loop.seed + 7), "train", 256, 32, cfg.text_frac),
        f,
        bb.preset.latent_channels,
    )
    scale = 1.0 / pca_code(D.crop_batch(np.random.default_rng(1), "train", 32, 32), mu, basis, f).std()
    ev_img, ev_lab = D.heldout_crops("val", cfg.eval_n, cfg.eval_size)

    def loss_fn(s: Step):
        x = s.shard(D.crop_batch(s.rng, "train", cfg.batch * s.world, cfg.crop, cfg.text_frac))
        w = max(0.0, 1 - s.step / max(1, cfg.pca_warm * loop.steps)) if cfg.pca_warm else 0.0
        code = pca_code(x, mu, basis, f) * scale if w > 0 else None  # warm start: latents near a patch-PCA code
        o = s.model(x, code)
        rec_loss = F.l1_loss(o["rec"].float(), x) + F.mse_loss(o["rec"].float(), x)
        loss = rec_loss + cfg.kl * o["kl"]
        logs = dict(rec=rec_loss.detach(), kl=o["kl"].detach())
        if code is not None:
            aux = F.mse_loss(o["z"].float(), code) + F.l1_loss(o["code_rec"].float(), x)
            loss = loss + w * aux
            logs["pca_aux"] = aux.detach()
        return loss, logs

    state = run_loop(loop, VAEStep(vae), loss_fn, lambda step: vae_eval(bb, ev_img, ev_lab), run_config=asdict(cfg))
    vae.requires_grad_(False)
    set_latent_stats(bb)
    return state


@torch.no_grad()
def set_latent_stats(bb: M.Backbone, n: int = 64, size: int = 128) -> dict:
    """FLUX-style latent normalisation: shift = mean, scaling = 1/std of the training latents."""
    x = D.crop_batch(np.random.default_rng(99), "train", n, size)
    z = torch.cat([bb.vae.encode(c[None] * 2 - 1).latent_dist.mode() for c in x])
    stats = dict(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    bb.vae.register_to_config(**stats)
    return stats


# ------------------------------------------------------------------------------------------------
# both stages, the card


def weights_hash(folder: str | Path) -> dict[str, str]:
    """sha256 of each safetensors file in a weights folder (the card records these)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*.safetensors"))}


def train_mini(args) -> Path:
    """Stage 1 VAE, stage 2 editor; each resumable from <run_dir>/<stage>/ckpt/."""
    run = Path(args.run_dir)
    if args.fresh and run.exists():
        shutil.rmtree(run)  # every stage starts over (the loop's own `fresh` covers one run folder)
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
        from .pretrain import EditorConfig, train_editor

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
        )  # fp32 on every CPU: the weights do not depend on the machine
        over = dict(
            task_probs=args.task_probs,
            upscale=args.upscale,  # CLI overrides of the recipe (probes)
            refine_kind_probs=getattr(args, "refine_kind_probs", None),
        )
        ecfg = EditorConfig(
            **{k: tuple(v) for k, v in over.items() if v}, **({"region": args.region} if args.region else {})
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
    from .pretrain import evaluate

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
    lines += ["## sha256", *[f"- {k}: `{v}`" for k, v in card.get("sha256", {}).items()], ""]
    path.write_text("\n".join(lines))


def load_checkpoint_weights(bb: M.Backbone, ckpt: str | Path) -> M.Backbone:
    """The trained weights of a loop checkpoint (ckpt/trainable.safetensors: transformer + text) into bb."""
    from safetensors.torch import load_file

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
    from .pretrain import EditorConfig, evaluate_refine

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
