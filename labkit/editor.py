"""Pretraining the mini editor DiT as a Kontext-style general editor (flow matching, CPU).

Tasks (one per batch, so sequence lengths match): reconstruct the context; upscale a bicubic-downscaled
context; denoise; restore a degraded region of the context from a reference that shows the same
content in another view (curriculum: the reference starts aligned and the view change grows).
The refinement benchmark itself (LRGI x2 + HRRI -> HRGT, instruction "refine") is left to adapters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .losses import flow_matching_loss, sample_t
from .train import LoopConfig, run_loop

TASKS = ("reconstruct", "upscale", "denoise", "restore")


@dataclass
class EditorConfig:
    """The mini editor recipe."""

    size: int = 128  # target side (64 tokens)
    batch: int = 8
    task_probs: tuple[float, float, float, float] = (0.15, 0.3, 0.15, 0.4)
    restore_degradations: tuple[str, ...] = ("blur", "color", "noise", "elastic", "glyph")
    curriculum_frac: float = 0.5  # fraction of steps over which the reference's view change ramps 0 -> 1
    upscale: int = 2
    noise: tuple[float, float] = (0.05, 0.15)


def task_batch(task: str, rng: np.random.Generator, split: str, cfg: EditorConfig, progress: float = 1.0) -> dict:
    """Pixels for one task: target (B,3,S,S), contexts [list of (B,3,h,w)], mask (B,1,S,S) or None."""
    b, s = cfg.batch, cfg.size
    if task == "restore":
        trips = [D.make_triplet(int(rng.integers(2**31)), split, s, factor=1, view_strength=min(1.0, progress / cfg.curriculum_frac),
                                degradation=str(rng.choice(cfg.restore_degradations)), area=(0.05, 0.25))
                 for _ in range(b)]
        stack = lambda k: torch.stack([getattr(t, k) for t in trips])  # noqa: E731
        return dict(target=stack("hrgt"), contexts=[stack("lrgi"), stack("hrri")], mask=stack("mask"))
    x = D.crop_batch(rng, split, b, s)
    if task == "reconstruct":
        ctx = x
    elif task == "upscale":
        ctx = F.interpolate(x, scale_factor=1 / cfg.upscale, mode="bicubic", antialias=True).clamp(0, 1)
    elif task == "denoise":
        sig = torch.from_numpy(rng.uniform(*cfg.noise, (b, 1, 1, 1))).float()
        ctx = (x + sig * torch.from_numpy(rng.standard_normal(x.shape)).float()).clamp(0, 1)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return dict(target=x, contexts=[ctx], mask=None)


def train_editor(bb, loop: LoopConfig, cfg: EditorConfig) -> dict:
    """Flow-matching pretraining of bb.transformer (+ instruction embedding); the VAE stays frozen."""
    bb.vae.requires_grad_(False)
    bb.transformer.requires_grad_(True)
    bb.text.requires_grad_(True)
    step = {"n": 0}
    val = {t: task_batch(t, np.random.default_rng(500 + i), "val", cfg) for i, t in enumerate(TASKS)}

    def encode(batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            return bb.encode(batch["target"]), [bb.encode(c) for c in batch["contexts"]]

    def loss_fn(rng):
        task = TASKS[rng.choice(len(TASKS), p=cfg.task_probs)]
        x0, ctx = encode(task_batch(task, rng, "train", cfg, progress=step["n"] / loop.steps))
        t = sample_t(rng, x0.shape[0])
        loss = flow_matching_loss(bb, x0, ctx, task, t, torch.from_numpy(rng.standard_normal(x0.shape)).float())
        step["n"] += 1
        return loss, {f"loss_{task}": loss.detach()}

    def eval_fn():
        out = {}
        g = np.random.default_rng(0)
        for task, batch in val.items():
            x0, ctx = encode(batch)
            ts = torch.full((x0.shape[0],), 0.5)
            out[f"val_loss_{task}"] = float(flow_matching_loss(bb, x0, ctx, task, ts, torch.from_numpy(g.standard_normal(x0.shape)).float()))
        return out

    state = run_loop(loop, {"transformer": bb.transformer, "text": bb.text}, loss_fn, eval_fn)
    bb.requires_grad_(False)
    return state
