"""Flow-matching samplers: the Euler ODE used everywhere, and the Flow-GRPO SDE step with its log-probability
(t: 1 = noise -> 0 = clean, as diffusers)."""
from __future__ import annotations

import math
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


# ------------------------------------------------------------------------------------------------
# Flow-GRPO: the same flow as an SDE with matching marginals, so each step is a Gaussian policy
def sde_std(t: float, t_next: float, noise_level: float = 0.7) -> float:
    """σ_t = a·sqrt(t / (1 - t)); at t = 1 the denominator uses 1 - t_next (as Flow-GRPO) to stay finite."""
    t, t_next = float(t), float(t_next)
    return noise_level * (t / (1 - (t_next if t >= 1 else t))) ** 0.5


def sde_mean(x_t: torch.Tensor, v: torch.Tensor, t: float, t_next: float, noise_level: float = 0.7) -> tuple[torch.Tensor, float]:
    """Mean and std of x_{t_next} | x_t: mean = x(1 + σ²dt/(2t)) + v(1 + σ²(1-t)/(2t))dt, std = σ·sqrt(-dt)."""
    dt = t_next - t  # < 0: time runs from noise (1) to data (0)
    s = sde_std(t, t_next, noise_level)
    mean = x_t * (1 + s ** 2 * dt / (2 * t)) + v * (1 + s ** 2 * (1 - t) / (2 * t)) * dt
    return mean, s * (-dt) ** 0.5


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std²·I) averaged over every non-batch dimension (Flow-GRPO's convention): (B,)."""
    lp = -((x.float() - mean.float()) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(v: torch.Tensor, x_t: torch.Tensor, t: float, t_next: float, noise_level: float = 0.7,
             generator: torch.Generator | None = None, x_next: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One stochastic step; returns (x_next, log p(x_next | x_t), mean, std). Pass x_next to score a stored step."""
    mean, std = sde_mean(x_t, v, t, t_next, noise_level)
    if x_next is None:
        x_next = mean + std * torch.randn(x_t.shape, generator=generator).to(x_t)
    return x_next, gaussian_logprob(x_next, mean, std), mean, std


@torch.no_grad()
def sde_sample(bb, contexts: Sequence[torch.Tensor], prompt: str, shape: tuple[int, ...], steps: int = 6,
               noise_level: float = 0.7, generator: torch.Generator | None = None, shift: float = 1.0) -> dict:
    """Sample with SDE steps (the last step to t = 0 is deterministic Euler, as Flow-GRPO's final step);
    returns the trajectory: latents (steps+1, B, ...), log_probs (steps-1, B), times (steps+1,)."""
    ts = timesteps(steps, shift)
    x = torch.randn(shape, generator=generator).to(bb.device)
    embeds = bb.encode_prompt(prompt, batch=shape[0])
    xs, lps = [x], []
    for i, (t0, t1) in enumerate(zip(ts[:-1].tolist(), ts[1:].tolist())):
        v = bb(x, t0, contexts, prompt_embeds=embeds)
        if t1 > 0:
            x, lp, _, _ = sde_step(v, x, t0, t1, noise_level, generator)
            lps.append(lp)
        else:
            x = x + (t1 - t0) * v
        xs.append(x)
    return dict(latents=torch.stack(xs), log_probs=torch.stack(lps) if lps else torch.zeros(0, shape[0]), times=ts)
