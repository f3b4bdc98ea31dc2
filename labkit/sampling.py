"""Flow-matching samplers: the Euler ODE used everywhere (t: 1 = noise -> 0 = clean, as diffusers)."""
from __future__ import annotations

from typing import Sequence

import torch


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps+1 decreasing times from 1 to 0, optionally shifted toward noise (FLUX-style shift)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler(bb, contexts: Sequence[torch.Tensor], prompt: str, shape: tuple[int, ...], steps: int = 8,
          generator: torch.Generator | None = None, x_t: torch.Tensor | None = None, t_start: float = 1.0,
          shift: float = 1.0, return_path: bool = False):
    """Integrate dx/dt = v from noise (or x_t at t_start) to t = 0; returns latents (B, 16, h, w)."""
    ts = timesteps(steps, shift)
    ts = ts[ts <= t_start + 1e-6]
    if x_t is None:
        x_t = torch.randn(shape, generator=generator).to(bb.device)
    embeds = bb.encode_prompt(prompt, batch=shape[0])
    path = [x_t]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v = bb(x_t, float(t0), contexts, prompt_embeds=embeds)
        x_t = x_t + (t1 - t0) * v
        path.append(x_t)
    return (x_t, path) if return_path else x_t
