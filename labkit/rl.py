"""Reward fine-tuning with GRPO (Flow-GRPO; OmniRefiner stage 2; UniRef-Image-Edit MSGRPO) for the
Kontext-style editor with a LoRA / FreqMoLE adapter as the policy.

One iteration: for each of `inputs` training triplets, G samples from the SDE sampler (each step a
Gaussian policy with a known log-probability), a reward per sample, advantages normalised within the
group, then the PPO-clipped surrogate over the sampled steps (+ β·KL to the reference policy, β = 0 by
default as in the papers). Inputs may carry K references packed into the sequence under a total pixel
budget (SELF), with the budget growing in stages over training. Built on labkit.loop.run_loop:
accelerate, AdamW, clipping, atomic checkpoints, exact resume, metrics CSV. Log-probabilities, ratios
and the KL are computed in fp32 whatever the autocast (labkit.sampling.sde_mean), as Flow-GRPO does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as D
from . import focus as F_
from . import metrics as Mt
from . import presets as P
from .editor import Refiner, edit
from .loop import LoopConfig, Step, run_loop
from .models import pack_references
from .results import git_commit
from .sampling import sde_mean, sde_sample, sde_step
from .util import case_seed, write_json


@dataclass
class GRPOConfig:
    """GRPO settings (Flow-GRPO defaults where the papers give them)."""

    group: int = 8  # G samples per input
    inputs: int = 2  # inputs per iteration
    sample_steps: int = 6  # few SDE steps while training
    eval_steps: int = 8  # deterministic Euler steps for held-out evaluation
    noise_level: float = 0.7  # a in σ_t = a·sqrt(t / (1 - t))
    clip_range: float = 0.2  # PPO clip ε (Flow-GRPO uses ~1e-4 with many updates per batch)
    adv_clamp: float = 5.0
    beta: float = 0.0  # KL to the reference (starting) policy
    train_frac: float = 1.0  # fraction of the SDE steps trained per iteration (random subset)
    w_detail: float = 1.0
    w_consistency: float = 1.0
    max_refs: int = 1  # K ~ U{1..max_refs} references per training input
    budgets: tuple[float, ...] = (1.0,)  # progressive total reference budget, × size², equal stages over training
    size: int = 128
    factor: int = 2
    bank: int = 64  # training triplets (train split)
    n_val: int = 8  # held-out inputs for the reward curve
    prompt: str = "refine"


# ------------------------------------------------------------------------------------------------
# rewards, advantages, objective
def make_reward(w_detail: float = 1.0, w_consistency: float = 1.0) -> Callable:
    """reward(outputs (G,3,H,W), case, draft) -> dict(total, detail, consistency), each (G,):
    detail = region PSNR vs HRGT / 10 (inside the mask); consistency = whole-image SSIM vs HRGT."""

    def reward(outputs: torch.Tensor, case, draft: torch.Tensor) -> dict[str, torch.Tensor]:
        gt = case.target[None].expand_as(outputs)
        m = case.mask[None].expand(outputs.shape[0], -1, -1, -1)
        detail = Mt.psnr(outputs, gt, m) / 10
        consistency = Mt.ssim(outputs, gt)
        return dict(total=w_detail * detail + w_consistency * consistency, detail=detail, consistency=consistency)

    return reward


def group_advantages(rewards: torch.Tensor, clamp: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> (r - mean_group) / (std_group + eps), clamped to ±clamp."""
    mu, sd = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True, unbiased=False)
    return ((rewards - mu) / (sd + eps)).clamp(-clamp, clamp)


def clipped_objective(
    logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict]:
    """PPO loss mean(max(-A·r, -A·clip(r, 1±ε))) with r = exp(logp - logp_old); also ratio and clip fraction."""
    logp, logp_old, adv = logp.float(), logp_old.float(), adv.float()
    ratio = torch.exp(logp - logp_old)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    clipped = ((ratio - 1).abs() > clip_range).float().mean()
    return loss, dict(ratio=ratio.detach().mean(), clipfrac=clipped.detach())


@contextlib.contextmanager
def swapped_adapter(transformer, state: dict[str, torch.Tensor]):
    """Temporarily load another adapter state (e.g. the reference policy) into the injected modules."""
    from . import adapters as AD  # pulls peft: imported where used

    current = {k: v.detach().clone() for k, v in AD.adapter_state(transformer).items()}
    transformer.load_state_dict(state, strict=False)
    try:
        yield
    finally:
        transformer.load_state_dict(current, strict=False)


# ------------------------------------------------------------------------------------------------
# inputs with K references under a pixel budget (SELF)
def references(case, k: int, budget: int, multiple: int = 16) -> list[torch.Tensor]:
    """The case's first k reference views, resized with one shared scale under `budget` total pixels."""
    views = [case.reference, *case.extra_refs][:k]
    if len(views) < k:
        raise ValueError(
            f"case has {len(views)} reference views, {k} asked: build it with make_triplet(..., extra_refs={k - 1})"
        )
    return pack_references(views, budget, multiple)


@torch.no_grad()
def contexts(bb, case, k: int, budget: int, region: str | None = None) -> list[torch.Tensor]:
    """Encoded contexts [draft, (region), ref_1..ref_k] (each (1, 16, h, w)); region: how the region reaches the
    editor (focus.region_contexts; default: as the backbone's editor was trained)."""
    region = region or P.editor_region(bb.preset.name)
    images = F_.region_contexts(case.draft, case.mask, references(case, k, budget, bb.multiple), region)
    return [bb.encode(x[None]) for x in images]


@torch.no_grad()
def rollout(bb, case, ctx: list[torch.Tensor], cfg: GRPOConfig, reward: Callable, generator: torch.Generator) -> dict:
    """G SDE samples for one input: trajectory, old log-probs, decoded outputs and their rewards."""
    g = cfg.group
    ctx_g = [c.expand(g, -1, -1, -1) for c in ctx]
    h, w = case.target.shape[-2:]
    traj = sde_sample(
        bb,
        ctx_g,
        cfg.prompt,
        (g, ctx[0].shape[1], h // bb.factor, w // bb.factor),
        cfg.sample_steps,
        cfg.noise_level,
        generator,
    )
    out = bb.decode(traj["latents"][-1]).cpu()
    r = reward(out, case, case.draft)
    return dict(traj=traj, ctx=ctx_g, outputs=out, reward=r)


def grpo_loss(
    bb, rolls: list[dict], cfg: GRPOConfig, rng: np.random.Generator, ref_state: dict | None = None, model=None
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (+ β·KL) over the stochastic steps of every rollout (a random train_frac of them);
    model: what the gradient flows through (the loop's prepared module; default bb)."""
    model = model or bb
    adv = group_advantages(torch.stack([r["reward"]["total"] for r in rolls]), cfg.adv_clamp)
    n_sde = rolls[0]["traj"]["log_probs"].shape[0]
    k = max(1, round(cfg.train_frac * n_sde))
    steps = sorted(rng.choice(n_sde, k, replace=False).tolist())
    embeds = bb.encode_prompt(cfg.prompt, batch=cfg.group)
    ref_means = {}
    if cfg.beta and ref_state is not None:  # the reference policy's means first: swapping weights in place
        with torch.no_grad(), swapped_adapter(bb.transformer, ref_state):  # must not happen inside the graph
            for p, roll in enumerate(rolls):
                tr = roll["traj"]
                for j in steps:
                    t0, t1 = float(tr["times"][j]), float(tr["times"][j + 1])
                    v = bb(tr["latents"][j], t0, roll["ctx"], prompt_embeds=embeds)
                    ref_means[p, j] = sde_mean(tr["latents"][j], v, t0, t1, cfg.noise_level)[0]
    n = len(rolls) * len(steps)
    total, logs = 0.0, dict(ratio=0.0, clipfrac=0.0, kl=0.0)
    for p, roll in enumerate(rolls):
        tr = roll["traj"]
        for j in steps:
            t0, t1 = float(tr["times"][j]), float(tr["times"][j + 1])
            x_t, x_next = tr["latents"][j], tr["latents"][j + 1]
            v = model(x_t, t0, roll["ctx"], prompt_embeds=embeds)
            _, lp, mean, std = sde_step(v, x_t, t0, t1, cfg.noise_level, x_next=x_next)
            loss, part = clipped_objective(lp, tr["log_probs"][j], adv[p], cfg.clip_range)
            if (p, j) in ref_means:
                kl = ((mean - ref_means[p, j]) ** 2).flatten(1).mean(1) / (2 * std**2)
                loss = loss + cfg.beta * kl.mean()
                logs["kl"] += float(kl.detach().mean()) / n
            total = total + loss / n
            logs["ratio"] += float(part["ratio"]) / n
            logs["clipfrac"] += float(part["clipfrac"]) / n
    return total, logs


def budget_at(cfg: GRPOConfig, step: int, total_steps: int) -> int:
    """The progressive pixel budget: stage = step * n_stages // total_steps."""
    stage = min(len(cfg.budgets) - 1, step * len(cfg.budgets) // max(1, total_steps))
    return int(cfg.budgets[stage] * cfg.size * cfg.size)


# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_policy(
    bb,
    cases: Sequence,
    reward: Callable,
    steps: int = 8,
    seed: int = 0,
    *,
    k: int = 1,
    budget: int | None = None,
    prompt: str = "refine",
    progress: bool = True,
) -> list[dict]:
    """Deterministic Euler samples (the 05_evaluate 'full' path) on held-out cases: reward and region metrics."""
    r = Refiner(bb, prompt)
    rows = []
    for i, c in enumerate(tqdm(cases, desc="evaluate policy", leave=False, disable=not progress, mininterval=2)):
        s = c.target.shape[-1]
        views = [c.reference, *c.extra_refs][:k]
        out = edit(r, c.draft, views, steps, seed + i, budget=budget or s * s)
        rw = reward(out[None], c, c.draft)
        rows.append(
            dict(
                case=i,
                scene=c.meta.get("seed", i),
                k=k,
                budget=budget or s * s,
                reward=float(rw["total"][0]),
                detail=float(rw["detail"][0]),
                consistency=float(rw["consistency"][0]),
                **Mt.case_row(out, c.target, c.mask, c.draft),
            )
        )
    return rows


def train_grpo(
    bb, loop: LoopConfig, cfg: GRPOConfig, spec: dict, reward: Callable | None = None, val_cases: Sequence | None = None
) -> dict:
    """GRPO on train-split triplets with the adapter already injected/loaded in bb (spec: what inject/load
    returned; only adapter weights train).

    Logs per step: reward mean/std, detail/consistency, ratio, clip fraction, KL, budget, and the seconds
    spent sampling vs updating; evals: held-out reward and KL to the starting policy. Saves the adapter."""
    from . import adapters as AD

    reward = reward or make_reward(cfg.w_detail, cfg.w_consistency)
    bb.requires_grad_(False)
    for n, p_ in bb.transformer.named_parameters():
        p_.requires_grad_("lora_" in n)
    if not any(p_.requires_grad for p_ in bb.transformer.parameters()):
        raise ValueError(
            "no adapter in the transformer: inject or load one (labkit.adapters.inject / load) before GRPO"
        )
    ref_state = {k: v.detach().clone() for k, v in AD.adapter_state(bb.transformer).items()}
    bank = [
        D.make_triplet(case_seed(loop.seed, i), "train", cfg.size, cfg.factor, extra_refs=cfg.max_refs - 1)
        for i in range(cfg.bank)
    ]
    val = (
        list(val_cases)
        if val_cases is not None
        else [D.make_triplet(case_seed(7, i), "val", cfg.size, cfg.factor) for i in range(cfg.n_val)]
    )

    def loss_fn(s: Step):
        t0 = time.time()
        rng = s.rng
        budget = budget_at(cfg, s.step, loop.steps)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        rolls = []
        picks = rng.choice(len(bank), cfg.inputs * s.world, replace=len(bank) < cfg.inputs * s.world)
        ks = rng.integers(1, cfg.max_refs + 1, len(picks))
        for i, k in zip(s.shard(picks), s.shard(ks)):  # each rank rolls out its share of the inputs
            rolls.append(rollout(bb, bank[i], contexts(bb, bank[i], int(k), budget), cfg, reward, gen))
        t1 = time.time()
        loss, logs = grpo_loss(bb, rolls, cfg, rng, ref_state, model=s.model)
        rew = torch.stack([r["reward"]["total"] for r in rolls])
        logs.update(
            reward=float(rew.mean()),
            reward_std=float(rew.std(1).mean()),
            budget=budget,
            detail=float(torch.stack([r["reward"]["detail"] for r in rolls]).mean()),
            consistency=float(torch.stack([r["reward"]["consistency"] for r in rolls]).mean()),
            sample_s=t1 - t0,
            update_fwd_s=time.time() - t1,
        )
        return loss, logs

    def eval_fn(step):
        rows = evaluate_policy(bb, val, reward, cfg.eval_steps, seed=0, prompt=cfg.prompt, progress=False)
        return dict(
            val_reward=float(np.mean([r["reward"] for r in rows])),
            val_region_psnr=float(np.mean([r["region_psnr"] for r in rows])),
            kl_to_start=policy_kl(bb, val[:2], ref_state, cfg),
        )

    state = run_loop(loop, bb, loss_fn, eval_fn, run_config=dict(grpo=asdict(cfg), spec=spec))
    if state["main"]:
        AD.save(
            bb.transformer,
            dict(
                spec,
                grpo=asdict(cfg),
                grpo_training=dict(
                    steps=state["step"],
                    seed=loop.seed,
                    lr=loop.lr,
                    mixed_precision=loop.mixed_precision,
                    git=git_commit(),
                ),
            ),
            Path(loop.out_dir) / "adapter",
        )
        write_json(dict(history=state["history"], evals=state["evals"]), Path(loop.out_dir) / "train_state.json")
    return state


@torch.no_grad()
def policy_kl(bb, cases: Sequence, ref_state: dict, cfg: GRPOConfig, seed: int = 0) -> float:
    """Mean KL between the current and the reference policy's Gaussian steps along fixed sampled states."""
    vals = []
    for i, c in enumerate(cases):
        ctx = contexts(bb, c, 1, cfg.size * cfg.size)
        s = c.target.shape[-1]
        tr = sde_sample(
            bb,
            ctx,
            cfg.prompt,
            (1, ctx[0].shape[1], s // bb.factor, s // bb.factor),
            cfg.sample_steps,
            cfg.noise_level,
            torch.Generator().manual_seed(seed + i),
        )
        emb = bb.encode_prompt(cfg.prompt, batch=1)
        for j in range(tr["log_probs"].shape[0]):
            t0, t1 = float(tr["times"][j]), float(tr["times"][j + 1])
            x = tr["latents"][j]
            _, _, mu, std = sde_step(
                bb(x, t0, ctx, prompt_embeds=emb), x, t0, t1, cfg.noise_level, x_next=tr["latents"][j + 1]
            )
            with swapped_adapter(bb.transformer, ref_state):
                mu_ref = sde_step(
                    bb(x, t0, ctx, prompt_embeds=emb), x, t0, t1, cfg.noise_level, x_next=tr["latents"][j + 1]
                )[2]
            vals.append(float(((mu - mu_ref) ** 2).mean() / (2 * std**2)))
    return float(np.mean(vals)) if vals else 0.0
