"""THE sampler (the backbone's FlowMatchEulerDiscreteScheduler, as diffusers' Flux pipelines use it) and the
Flow-GRPO SDE step with its log-probability (t: 1 = noise -> 0 = clean, as diffusers)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch


def scheduler(bb):
    """A fresh FlowMatchEulerDiscreteScheduler from the backbone's scheduler config (the one it shipped with)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # heavy: imported where used

    return FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler_config)


def shift_mu(config, n_tokens: int) -> float:
    """FLUX's dynamic shift: mu linear in the target's token count (base_image_seq_len -> max_image_seq_len)."""
    a, b = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return lo + (hi - lo) * (n_tokens - a) / (b - a)


MAX_STEPS = 1000  # more sampler steps than any schedule needs (FLUX.1-Kontext: 28)


def check_steps(steps) -> int:
    """Sampler steps: an integer >= 1 (numpy integers accepted)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(
            f"steps (--steps) must be an integer in 1..{MAX_STEPS} (the number of sampler steps); got {steps!r}"
        )
    return int(steps)


def prepare(bb, steps: int, n_tokens: int, strength: float = 1.0):
    """A scheduler set up as FluxKontextPipeline does (sigmas linspace(1, 1/N, N), dynamic shift from the
    target's token count when the config asks for it), cut to the last strength·N steps (img2img)."""
    steps = check_steps(steps)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    sch = scheduler(bb)
    mu = shift_mu(sch.config, n_tokens) if sch.config.use_dynamic_shifting else None
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu, device="cpu")
    start = steps - min(steps, max(1, int(steps * strength)))  # the pipelines' get_timesteps, at least one step
    if start:
        sch.set_begin_index(start)
    return sch, start


def times(bb, steps: int, n_tokens: int, strength: float = 1.0) -> torch.Tensor:
    """The sampler's noise levels (k+1,) from the first used sigma down to 0 (t = sigma; 1 = noise)."""
    sch, start = prepare(bb, steps, n_tokens, strength)
    return sch.sigmas[start:].float()


@torch.no_grad()
def sample(
    bb,
    contexts: Sequence[torch.Tensor],
    prompt: str | None,
    shape: tuple[int, ...],
    *,
    steps: int = 8,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    keep: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    prompt_embeds: tuple | None = None,
    guidance: float | None = None,
    negative_embeds: tuple | None = None,
    true_cfg: float = 1.0,
    return_path: bool = False,
    callback: Callable | None = None,
):
    """THE sampler: the backbone's scheduler (Euler steps in fp32, as diffusers), from noise or from `init`
    latents noised to `strength` (img2img); with keep/keep_mask (latent grid, 1 = keep) the kept latents,
    noised to the current level, are blended back after every step (FluxKontextInpaintPipeline's way).
    guidance: the embedded guidance of guidance-distilled models (FLUX.1-Kontext-dev); negative_embeds +
    true_cfg > 1: true CFG, v = v_neg + true_cfg·(v - v_neg), as the pipeline.
    callback(i, n, x0): called after step i of n with the step's x0 prediction x_t - sigma·v (latents), as
    diffusers' callback_on_step_end; it may raise to stop the run (the studio's cancel button does).
    Returns latents (B, C, h, w) (and the path of latents when return_path)."""
    n_tokens = shape[-2] * shape[-1] // 4
    sch, start = prepare(bb, steps, n_tokens, strength)
    noise = latents if latents is not None else torch.randn(shape, generator=generator)
    noise = noise.to(bb.device, torch.float32)
    ts = sch.timesteps[start:]
    x = noise if init is None else sch.scale_noise(init.to(noise), ts[:1], noise)
    embeds = prompt_embeds or bb.encode_prompt(prompt, batch=shape[0])
    kw = {} if guidance is None else dict(guidance=guidance)
    path = [x]
    for i, t in enumerate(ts):
        v = bb(x, float(t) / 1000, contexts, prompt_embeds=embeds, **kw)
        if negative_embeds is not None and true_cfg > 1:
            v_neg = bb(x, float(t) / 1000, contexts, prompt_embeds=negative_embeds, **kw)
            v = v_neg + true_cfg * (v - v_neg)
        x0 = (
            x - float(t) / 1000 * v.float() if callback is not None else None
        )  # flow: x_t = (1-s)·x0 + s·eps, v = eps - x0
        x = sch.step(v.float(), t, x, return_dict=False)[0].float()
        if keep is not None:
            nxt = ts[i + 1 : i + 2]
            k = sch.scale_noise(keep.float(), nxt, noise) if len(nxt) else keep.float()
            x = keep_mask * k + (1 - keep_mask) * x
        path.append(x)
        if callback is not None:
            callback(i, len(ts), x0 if keep is None else keep_mask * keep.float() + (1 - keep_mask) * x0)
    return (x, path) if return_path else x


# ------------------------------------------------------------------------------------------------
# Flow-GRPO: the same flow as an SDE with matching marginals, so each step is a Gaussian policy
def sde_std(t: float, t_next: float, noise_level: float = 0.7) -> float:
    """σ_t = a·sqrt(t / (1 - t)); at t = 1 the denominator uses 1 - t_next (as Flow-GRPO) to stay finite."""
    t, t_next = float(t), float(t_next)
    return noise_level * (t / (1 - (t_next if t >= 1 else t))) ** 0.5


def sde_mean(
    x_t: torch.Tensor, v: torch.Tensor, t: float, t_next: float, noise_level: float = 0.7
) -> tuple[torch.Tensor, float]:
    """Mean and std of x_{t_next} | x_t: mean = x(1 + σ²dt/(2t)) + v(1 + σ²(1-t)/(2t))dt, std = σ·sqrt(-dt)."""
    dt = t_next - t  # < 0: time runs from noise (1) to data (0)
    s = sde_std(t, t_next, noise_level)
    x_t, v = x_t.float(), v.float()  # log-probs, ratios and KL in fp32 whatever the autocast (as Flow-GRPO)
    mean = x_t * (1 + s**2 * dt / (2 * t)) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt
    return mean, s * (-dt) ** 0.5


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std²·I) averaged over every non-batch dimension (Flow-GRPO's convention): (B,)."""
    lp = -((x.float() - mean.float()) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(
    v: torch.Tensor,
    x_t: torch.Tensor,
    t: float,
    t_next: float,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    x_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One stochastic step; returns (x_next, log p(x_next | x_t), mean, std). Pass x_next to score a stored step."""
    mean, std = sde_mean(x_t, v, t, t_next, noise_level)
    if x_next is None:
        x_next = mean + std * torch.randn(x_t.shape, generator=generator).to(mean)
    return x_next, gaussian_logprob(x_next, mean, std), mean, std


@torch.no_grad()
def sde_sample(
    bb,
    contexts: Sequence[torch.Tensor],
    prompt: str,
    shape: tuple[int, ...],
    steps: int = 6,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    model=None,
) -> dict:
    """Sample with SDE steps on the sampler's noise levels (the last step to t = 0 is deterministic Euler,
    as Flow-GRPO's final step); returns the trajectory: latents (steps+1, B, ...), log_probs (steps-1, B),
    times (steps+1,). model: what to call (default bb; the prepared module while training)."""
    ts = times(bb, steps, shape[-2] * shape[-1] // 4)
    model = model or bb
    x = torch.randn(shape, generator=generator).to(bb.device)
    embeds = bb.encode_prompt(prompt, batch=shape[0])
    xs, lps = [x], []
    for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = model(x, t0, contexts, prompt_embeds=embeds)
        if t1 > 0:
            x, lp, _, _ = sde_step(v, x, t0, t1, noise_level, generator)
            lps.append(lp)
        else:
            x = x + (t1 - t0) * v.float()
        xs.append(x)
    return dict(latents=torch.stack(xs), log_probs=torch.stack(lps) if lps else torch.zeros(0, shape[0]), times=ts)
