"""One training entry point (accelerate): the mini backbone (VAE, then editor), and adapter SFT.

    python -m labkit.train mini [--fresh] [--vae-minutes 35] [--editor-minutes 40]
    python -m labkit.train sft --preset mini --adapter freqmole --w-freq 0.5 --out runs/sft/x
    accelerate launch -m labkit.train sft ...

Every loop: AdamW, warmup + cosine, grad clipping, optional EMA of the trained weights (diffusers'
EMAModel), bf16 autocast where it is fast (see resolve_precision), tqdm, metrics CSV, validation at
fixed seeds (numbers + images), checkpoints written atomically every N steps, exact resume (model,
optimiser, schedule, EMA, RNG and data-RNG state).
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as D
from . import models as M
from . import presets as P
from .util import REPO, atomic_save, seed_everything, write_json

RUNS = REPO / "runs"


@dataclass
class LoopConfig:
    """Optimisation settings shared by every labkit training loop."""

    steps: int = 1000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup: int = 100
    min_lr_frac: float = 0.05
    clip: float = 1.0
    ckpt_every: int = 200
    eval_every: int = 200
    max_minutes: float | None = None  # stop early (and save) when the wall-clock budget is spent
    mixed_precision: str = "auto"  # bf16 on CUDA or a CPU with native bf16 (AVX512-BF16/AMX); else fp32
    ema: float = 0.0  # EMA decay of the trained weights (0 = off); evals and the final weights use the EMA
    seed: int = 0
    out_dir: str = str(RUNS / "scratch")
    progress: bool = True


def resolve_precision(mp: str) -> str:
    """'auto' -> bf16 where it is fast (CUDA, or CPUs with native bf16), else 'no'.

    Measured here: on an AVX2-only CPU, bf16 autocast made a VAE step 10x slower than fp32."""
    if mp != "auto":
        return mp
    if torch.cuda.is_available():
        return "bf16"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def lr_lambda(cfg: LoopConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_lr_frac."""
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def run_loop(cfg: LoopConfig, modules: dict[str, torch.nn.Module], loss_fn: Callable, eval_fn: Callable | None = None,
             params: list | None = None) -> dict:
    """Train `modules` by minimising loss_fn(rng, step) -> (loss, logs); resumes from out_dir/ckpt.pt if present.

    loss_fn gets the data RNG (restored on resume) and the 0-based step, so schedules inside it resume too.
    eval_fn(step) -> dict of numbers runs every eval_every steps under no_grad (with the EMA weights swapped
    in when cfg.ema > 0); it may also write validation images into out_dir. With EMA the modules end
    holding the EMA weights."""
    from accelerate import Accelerator
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available())
    seed_everything(cfg.seed)
    params = params if params is not None else [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    rng = np.random.default_rng(cfg.seed)
    state = dict(step=0, history=[], evals=[], seconds=0.0)
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel
        ema = EMAModel(params, decay=cfg.ema, use_ema_warmup=False, foreach=False)
    ckpt = out / "ckpt.pt"
    if ckpt.exists():  # exact resume
        s = torch.load(ckpt, weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(s["modules"][k])
        opt.load_state_dict(s["opt"]), sched.load_state_dict(s["sched"])
        if ema is not None:
            ema.load_state_dict(s["ema"])
        rng.bit_generator.state = s["np_rng"]
        torch.set_rng_state(s["torch_rng"])
        state = s["state"]
    wrapped = acc.prepare(*modules.values(), opt)
    opt = wrapped[-1]

    def save() -> None:
        s = dict(modules={k: m.state_dict() for k, m in modules.items()}, opt=opt.state_dict(), sched=sched.state_dict(),
                 np_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(), state=state,
                 ema=ema.state_dict() if ema is not None else None)
        atomic_save(lambda p: torch.save(s, p), ckpt)
        _write_csv(out / "metrics.csv", state["history"])

    t0, start = time.time(), state["seconds"]
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not cfg.progress, desc=out.name, mininterval=5)
    for m in modules.values():
        m.train()
    while state["step"] < cfg.steps:
        with acc.autocast():
            loss, logs = loss_fn(rng, state["step"])
        acc.backward(loss)
        gn = acc.clip_grad_norm_(params, cfg.clip) if cfg.clip else torch.tensor(0.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        state["step"] += 1
        state["seconds"] = start + time.time() - t0
        state["history"].append(dict(step=state["step"], loss=float(loss.detach()), grad_norm=float(gn), lr=sched.get_last_lr()[0],
                                     seconds=round(state["seconds"], 2), **{k: float(v) for k, v in logs.items()}))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        done = state["step"] >= cfg.steps or (cfg.max_minutes and state["seconds"] > 60 * cfg.max_minutes)
        if eval_fn and (state["step"] % cfg.eval_every == 0 or done):
            for m in modules.values():
                m.eval()
            if ema is not None:
                ema.store(params), ema.copy_to(params)
            with torch.no_grad():
                state["evals"].append(dict(step=state["step"], seconds=round(state["seconds"], 1), **eval_fn(state["step"])))
            if ema is not None:
                ema.restore(params)
            for m in modules.values():
                m.train()
            bar.write(f"[{out.name}] step {state['step']}: {state['evals'][-1]}")
        if state["step"] % cfg.ckpt_every == 0 or done:
            save()
        if done:
            break
    bar.close()
    if ema is not None:
        ema.copy_to(params)
    for m in modules.values():
        m.eval()
    return state


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def w(p):
        with open(p, "w", newline="") as f:
            wr = csv.DictWriter(f, keys)
            wr.writeheader()
            wr.writerows(rows)
    atomic_save(w, path)


# ------------------------------------------------------------------------------------------------
# mini stage 1: the VAE
@dataclass
class VAEConfig:
    """The mini VAE recipe (ENV_NOTES: measured on 2 CPU cores) plus a PCA warm start."""

    crop: int = 48
    batch: int = 16
    text_frac: float = 0.35
    kl: float = 1e-6
    pca_warm: float = 0.3  # fraction of steps with the auxiliary 'match an 8x8-patch PCA code' loss
    eval_size: int = 128
    eval_n: int = 24


def patch_pca(images: torch.Tensor, factor: int = 8, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and top-k basis (D, k) of the factor×factor×3 patches of images (B, 3, H, W)."""
    from einops import rearrange
    x = rearrange(images, "b c (h p) (w q) -> (b h w) (c p q)", p=factor, q=factor)
    mu = x.mean(0)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    return mu, v[:k].T


def pca_code(images: torch.Tensor, mu: torch.Tensor, basis: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(B, 3, H, W) -> (B, k, H/f, W/f) patch-PCA coefficients."""
    from einops import rearrange
    h = images.shape[-2] // factor
    x = rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=factor, q=factor)
    return rearrange((x - mu) @ basis, "b (h w) k -> b k h w", h=h)


def bicubic_x(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic down by `factor` (anti-aliased) and back up: the no-model baseline at equal scale."""
    import torch.nn.functional as F
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def vae_eval(bb: M.Backbone, images: torch.Tensor, labels: list[str]) -> dict:
    """Held-out PSNR/SSIM of the VAE round trip vs bicubic x8 on the same images."""
    from .metrics import psnr, ssim
    rec = torch.cat([bb.vae.decode(bb.vae.encode(x[None] * 2 - 1).latent_dist.mode()).sample for x in images])
    rec = ((rec + 1) / 2).clamp(0, 1).float()
    bic = bicubic_x(images, bb.preset.vae_factor)
    out = dict(vae_psnr=psnr(rec, images).mean().item(), bicubic_psnr=psnr(bic, images).mean().item(),
               vae_ssim=ssim(rec, images).mean().item(), bicubic_ssim=ssim(bic, images).mean().item())
    for kind in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == kind]
        out[f"vae_psnr_{kind}"] = psnr(rec[idx], images[idx]).mean().item()
        out[f"bicubic_psnr_{kind}"] = psnr(bic[idx], images[idx]).mean().item()
    return out


def train_vae(bb: M.Backbone, loop: LoopConfig, cfg: VAEConfig) -> dict:
    """Train the backbone's AutoencoderKL (L1 + MSE + KL, PCA warm start); set scaling/shift from latents."""
    import torch.nn.functional as F
    vae = bb.vae.requires_grad_(True)
    f = bb.preset.vae_factor
    mu, basis = patch_pca(D.crop_batch(np.random.default_rng(loop.seed + 7), "train", 256, 32, cfg.text_frac), f, bb.preset.latent_channels)
    scale = 1.0 / pca_code(D.crop_batch(np.random.default_rng(1), "train", 32, 32), mu, basis, f).std()
    ev_img, ev_lab = D.heldout_crops("val", cfg.eval_n, cfg.eval_size)
    def loss_fn(rng, step):
        x = D.crop_batch(rng, "train", cfg.batch, cfg.crop, cfg.text_frac)
        post = vae.encode(x * 2 - 1).latent_dist
        z = post.mode()
        rec = (vae.decode(z).sample + 1) / 2
        rec_loss = F.l1_loss(rec.float(), x) + F.mse_loss(rec.float(), x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + cfg.kl * kl
        logs = dict(rec=rec_loss.detach(), kl=kl.detach())
        w = max(0.0, 1 - step / max(1, cfg.pca_warm * loop.steps)) if cfg.pca_warm else 0.0
        if w > 0:  # warm start: latents near a patch-PCA code, decoder inverts that code
            code = pca_code(x, mu, basis, f) * scale
            aux = F.mse_loss(z.float(), code) + F.l1_loss(((vae.decode(code.to(z.dtype)).sample + 1) / 2).float(), x)
            loss = loss + w * aux
            logs["pca_aux"] = aux.detach()
        return loss, logs

    state = run_loop(loop, {"vae": vae}, loss_fn, lambda step: vae_eval(bb, ev_img, ev_lab))
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
# adapter SFT on LRGI + HRRI -> HRGT triplets (RefGC-SR2 task; OmniRefiner stage 1)
@dataclass
class SFTConfig:
    """Adapter fine-tuning: which adapter, which extra losses (weights 0 = off)."""

    adapter: str = "freqmole"  # freqmole | lora
    rank: int = 8
    w_freq: float = 0.0  # RefGC-SR2 frequency loss weight (λ_LF = λ_HF = w_freq)
    sigma: float = 1.0  # Gaussian σ of the latent LF/HF split
    boundary_alpha: float = 0.0  # RefineAnything boundary loss α (9 in the paper); 0 = plain flow loss
    boundary_radius: int = 16
    mask_weight: float = 0.0  # OmniRefiner masked loss: extra weight inside the mask
    alpha_freeze_step: int = -1  # freeze FreqMoLE's α from this step on (-1: never)
    size: int = 128
    factor: int = 2
    batch: int = 8
    bank: int = 256  # pre-encoded training triplets
    prompt: str = "refine"
    val_images: int = 4  # val triplets sampled (Euler, fixed seed) and saved as out/val/step_*.png at each eval
    val_steps: int = 4


@torch.no_grad()
def triplet_bank(bb: M.Backbone, n: int, split: str, size: int, factor: int, seed: int = 0) -> dict:
    """Latents of n triplets (HRGT, bicubic-up LRGI, HRRI) plus their pixel masks, for fast CPU steps."""
    trips = [D.make_triplet(seed * 100_000 + i, split, size, factor) for i in range(n)]
    enc = lambda xs: torch.cat([bb.encode(x).cpu() for x in xs])  # noqa: E731
    return dict(hrgt=enc([t.hrgt[None] for t in trips]), lrgi=enc([t.draft[None] for t in trips]), hrri=enc([t.hrri[None] for t in trips]),
                mask=torch.stack([t.mask for t in trips]), ref_mask=torch.stack([t.ref_mask for t in trips]))


def sft_loss(bb: M.Backbone, batch: dict, cfg: SFTConfig, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Flow loss (optionally boundary/mask weighted) + optional frequency loss on the one-step estimate ẑ0."""
    from . import losses as L
    x0 = batch["hrgt"]
    x_t = L.noisy(x0, eps, t)
    v = bb(x_t, t, [batch["lrgi"], batch["hrri"]], prompt=cfg.prompt)
    hw = x0.shape[-2:]
    w = None
    if cfg.boundary_alpha:
        w = L.boundary_weight(batch["mask"], hw, cfg.boundary_alpha, cfg.boundary_radius)
    if cfg.mask_weight:
        w = (w if w is not None else 1.0) + cfg.mask_weight * L.resize_mask(batch["mask"], hw)
    loss = L.weighted_mse(v, eps - x0, w) / x0.shape[1]
    logs = dict(flow=loss.detach())
    if cfg.w_freq:
        fl, parts = L.frequency_loss(L.x0_estimate(x_t, v, t), x0, batch["hrri"], batch["mask"], batch["ref_mask"],
                                     cfg.sigma, cfg.w_freq, cfg.w_freq)
        loss = loss + fl
        logs.update(parts)
    return loss, logs


def train_sft(bb: M.Backbone, loop: LoopConfig, cfg: SFTConfig) -> dict:
    """Inject adapters into the frozen editor, fine-tune on train triplets, save adapter.safetensors."""
    from . import freqmole as FM
    bb.requires_grad_(False)
    spec = FM.inject(bb.transformer, cfg.adapter, rank=cfg.rank)
    bank = triplet_bank(bb, cfg.bank, "train", cfg.size, cfg.factor, loop.seed)
    val = triplet_bank(bb, 16, "val", cfg.size, cfg.factor, seed=7)
    val_trips = [D.make_triplet(7 * 100_000 + i, "val", cfg.size, cfg.factor) for i in range(cfg.val_images)]
    params = [p for p in bb.transformer.parameters() if p.requires_grad]

    def loss_fn(rng, step):
        if cfg.alpha_freeze_step >= 0 and step == cfg.alpha_freeze_step:
            FM.set_alpha_trainable(bb.transformer, False)
        idx = torch.from_numpy(rng.choice(cfg.bank, cfg.batch, replace=cfg.bank < cfg.batch))
        from .losses import sample_t
        t = sample_t(rng, cfg.batch)
        eps = torch.from_numpy(rng.standard_normal(bank["hrgt"][idx].shape)).float()
        return sft_loss(bb, {k: v[idx] for k, v in bank.items()}, cfg, t, eps)

    def eval_fn(step):
        g = np.random.default_rng(0)
        t = torch.full((16,), 0.5)
        eps = torch.from_numpy(g.standard_normal(val["hrgt"].shape)).float()
        out = dict(val_loss=float(sft_loss(bb, val, cfg, t, eps)[0]))
        if val_trips:
            rows, imgs = evaluate_refiner(bb, val_trips, cfg.val_steps, seed=0, prompt=cfg.prompt, return_images=True)
            out["val_region_psnr"] = float(np.mean([r["region_psnr"] for r in rows]))
            save_val_grid(val_trips, imgs, Path(loop.out_dir) / "val" / f"step_{step:06d}.png",
                          f"step {step}: val region PSNR {out['val_region_psnr']:.2f} dB")
        return out

    state = run_loop(loop, {"transformer": bb.transformer}, loss_fn, eval_fn, params=params)
    from .util import git_commit
    provenance = dict(steps=state["step"], seed=loop.seed, lr=loop.lr, ema=loop.ema, git=git_commit(),
                      val=state["evals"][-1] if state["evals"] else None)
    FM.save(bb.transformer, dict(spec, sft=asdict(cfg), training=provenance), loop.out_dir)
    write_json(dict(history=state["history"], evals=state["evals"]), Path(loop.out_dir) / "train_state.json")
    return state


def save_val_grid(trips: list, outputs: list[torch.Tensor], path: Path, title: str = "") -> Path:
    """One PNG: a row per val triplet (LRGI up, HRRI, output, HRGT) - the images the training log points at."""
    from . import viz
    rows = [[t.draft, t.hrri, y, t.hrgt] for t, y in zip(trips, outputs)]
    fig = viz.grid(rows, ["LRGI (bicubic up)", "HRRI", "output", "HRGT"], size=1.4)
    fig.suptitle(title, fontsize=8, y=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = viz.save(fig, path.stem, path.parent)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return out


@torch.no_grad()
def evaluate_refiner(bb: M.Backbone, trips: list, steps: int = 8, seed: int = 0, prompt: str = "refine",
                     return_images: bool = False):
    """Sample HRGT from [LRGI (bicubic up), HRRI] with Euler; per-case whole/region PSNR, SSIM, HF ratio,
    next to the bicubic-upsampled LRGI baseline (and the output images when return_images)."""
    import torch.nn.functional as F
    from .metrics import hf_energy_ratio, psnr, ssim
    from .sampling import euler
    rows, images = [], []
    for i, t in enumerate(trips):
        s = t.hrgt.shape[-1]
        up = t.draft[None]
        ctx = [bb.encode(up), bb.encode(t.hrri[None])]
        z = euler(bb, ctx, prompt, shape=(1, 16, s // bb.factor, s // bb.factor), steps=steps,
                  generator=torch.Generator().manual_seed(seed + i))
        y, gt, m = bb.decode(z).cpu(), t.hrgt[None], t.mask[None]
        rows.append(dict(case=i, content=t.meta["content"], psnr=psnr(y, gt).item(), ssim=ssim(y, gt).item(),
                         region_psnr=psnr(y, gt, m).item(), region_hf=hf_energy_ratio(y, gt, m).item(),
                         lrgi_psnr=psnr(up, gt).item(), lrgi_region_psnr=psnr(up, gt, m).item()))
        images.append(y[0])
    return (rows, images) if return_images else rows


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m labkit.train mini [--fresh] ...`."""
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
    for f_ in fields(SFTConfig):
        s.add_argument(f"--{f_.name.replace('_', '-')}", type=type(f_.default), default=f_.default)
    args = ap.parse_args(argv)
    if args.cmd == "mini":
        from .mini import train_mini
        train_mini(args)
    elif args.cmd == "sft":
        bb = M.load(args.preset)
        cfg = SFTConfig(**{f_.name: getattr(args, f_.name) for f_ in fields(SFTConfig)})
        loop = LoopConfig(steps=args.steps, lr=args.lr, warmup=min(50, args.steps // 10 + 1), ckpt_every=100,
                          eval_every=max(1, args.steps // 4), seed=args.seed, out_dir=args.out, ema=args.ema)
        train_sft(bb, loop, cfg)


if __name__ == "__main__":
    main()
