"""Adapter SFT (RefGC-SR2's FreqMoLE / plain LoRA; OmniRefiner stage 1) on LRGI + HRRI -> HRGT triplets,
a recipe on labkit.loop: the frozen editor, adapters injected into every block, flow loss (optionally
boundary / mask weighted) plus RefGC-SR2's frequency loss on the one-step estimate ẑ0.

    python -m labkit.train sft --preset mini --adapter freqmole --w-freq 0.5 --out runs/sft/x
    accelerate launch -m labkit.train sft ...   (the same, N processes: --batch is per process)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cases as CS
from . import data as D
from . import focus as F_
from . import losses as L
from . import models as M
from . import presets as P
from .loop import LoopConfig, Step, run_loop
from .metrics import case_row
from .results import git_commit
from .sampling import sample
from .util import case_seed, main_process, write_json


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
    alpha_freeze_step: int = -1  # freeze FreqMoLE's α from this step on (-1: never); survives resume
    size: int = 128
    factor: int = 2
    batch: int = 8  # per process
    bank: int = 256  # pre-encoded training triplets
    prompt: str = "refine"
    region: str = (
        "auto"  # how the region reaches the editor (focus.region_contexts): none | context | draw | auto (the editor's)
    )
    frozen_dtype: str = "float32"  # the frozen editor's weights: float32 | bfloat16 (adapters always train in fp32)
    data_dir: str = (
        ""  # a case folder (metadata.jsonl): train on its train split, validate on its val split, per-case prompts
    )
    val_images: int = 4  # val triplets sampled at a fixed seed and saved as out/val/step_*.png at each eval
    val_steps: int = 4

    def check(self) -> SFTConfig:
        """Refuse settings that would fail later (a usage error naming the flag), before anything is written."""
        rules = {
            "adapter": self.adapter in ("freqmole", "lora"), "rank": self.rank >= 1, "size": self.size >= 16,
            "factor": self.factor >= 1 and self.size % max(self.factor, 1) == 0, "batch": self.batch >= 1,
            "bank": self.bank >= 1, "frozen_dtype": self.frozen_dtype in ("float32", "bfloat16"),
            "region": self.region in ("auto", "none", "context", "draw"), "val_steps": self.val_steps >= 1,
            "val_images": self.val_images >= 0, "sigma": self.sigma > 0, "boundary_radius": self.boundary_radius >= 1,
        }  # fmt: skip
        allowed = dict(adapter="freqmole | lora", frozen_dtype="float32 | bfloat16", size=">= 16",
                       region="auto | none | context | draw", factor="a divisor of --size")  # fmt: skip
        for name, ok in rules.items():
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)!r} is not allowed: use {allowed.get(name, '>= 1')}")
        return self


@torch.no_grad()
def bank_of(bb: M.Backbone, cases: list, prompts: list[str], default_prompt: str, region: str = "none") -> dict:
    """Latents of cases (target, draft - the region drawn on it with region='draw' -, reference, and the region
    image with region='context'; one size) plus pixel masks and each case's prompt index into `prompts`
    (extended in place): encoded once, for fast CPU steps."""
    enc = lambda xs: torch.cat([bb.encode(x[None]).float().cpu() for x in xs])  # noqa: E731
    for c in cases:
        p = getattr(c, "prompt", None) or default_prompt
        if p not in prompts:
            prompts.append(p)
    ctx = [
        F_.region_contexts(c.draft, c.mask, [c.reference], region) for c in cases
    ]  # [draft, (region image), reference]
    extra = dict(region=enc([x[1] for x in ctx])) if region == "context" else {}
    return extra | dict(
        target=enc([c.target for c in cases]),
        draft=enc([x[0] for x in ctx]),
        reference=enc([c.reference for c in cases]),
        mask=torch.stack([c.mask for c in cases]),
        ref_mask=torch.stack([c.ref_mask for c in cases]),
        prompt=torch.tensor([prompts.index(getattr(c, "prompt", None) or default_prompt) for c in cases]),
    )


def sft_data(cfg: SFTConfig, seed: int) -> tuple[list, list]:
    """Train cases and val cases: the built-in triplets, or a case folder's train and val splits at size x size."""
    if not cfg.data_dir:
        return (
            [D.make_triplet(case_seed(seed, i), "train", cfg.size, cfg.factor) for i in range(cfg.bank)],
            [D.make_triplet(case_seed(7, i), "val", cfg.size, cfg.factor) for i in range(16)],
        )
    train = [c.resized(cfg.size) for c in CS.load_cases(cfg.data_dir, "train")]
    val = [c.resized(cfg.size) for c in CS.load_cases(cfg.data_dir, "val")]
    if not train:
        raise ValueError(f'{cfg.data_dir} has no train cases: mark lines "split": "train" (or leave split out)')
    CS.require_targets(train + val, "SFT cases")  # before any work
    if not val:
        print(f"{cfg.data_dir} has no val split: the 'val' numbers are computed on 4 of its train cases", flush=True)
    return train, val or train[:4]


def sft_loss(
    model, batch: dict, cfg: SFTConfig, t: torch.Tensor, eps: torch.Tensor, embeds: tuple | None = None
) -> tuple[torch.Tensor, dict]:
    """Flow loss (optionally boundary/mask weighted) + optional frequency loss on the one-step estimate ẑ0.

    model: the Backbone, or the loop's prepared module around it; embeds: the prompt encoded once (1, ...)
    (the text encoders stay frozen, so like diffusers' Kontext LoRA script they run once, not every step)."""
    x0 = batch["target"]
    x_t = L.noisy(x0, eps, t)
    if embeds is None:
        kw = dict(prompt=cfg.prompt)
    else:  # the prompt table (P, ...) encoded once; each example its own prompt
        i = batch["prompt"].to(embeds[0].device)
        kw = dict(prompt_embeds=(embeds[0][i], embeds[1][i], embeds[2]))
    v = model(x_t, t, [batch["draft"], *([batch["region"]] if "region" in batch else []), batch["reference"]], **kw)
    hw = x0.shape[-2:]
    w = None
    if cfg.boundary_alpha:
        w = L.boundary_weight(batch["mask"], hw, cfg.boundary_alpha, cfg.boundary_radius)
    if cfg.mask_weight:
        w = (w if w is not None else 1.0) + cfg.mask_weight * L.resize_mask(batch["mask"], hw)
    loss = L.weighted_mse(v, eps - x0, w) / x0.shape[1]
    logs = dict(flow=loss.detach())
    if cfg.w_freq:
        fl, parts = L.frequency_loss(
            L.x0_estimate(x_t, v.float(), t),
            x0,
            batch["reference"],
            batch["mask"],
            batch["ref_mask"],
            cfg.sigma,
            cfg.w_freq,
            cfg.w_freq,
        )
        loss = loss + fl
        logs.update(parts)
    return loss, logs


def train_sft(bb: M.Backbone, loop: LoopConfig, cfg: SFTConfig, free_text_encoders: bool = False) -> dict:
    """Inject adapters into the frozen editor, fine-tune on train triplets; the adapter (safetensors + json with
    provenance and the backbone's identity) goes to <out_dir>/adapter/, written as one folder. free_text_encoders
    (a pipeline backbone; what `labkit train sft` does): once every prompt is encoded, T5/CLIP are freed."""
    from . import adapters as AD  # pulls peft: imported where used

    if cfg.region == "auto":  # train the adapter on the contexts its editor reads (recorded in adapter.json)
        cfg = replace(cfg, region=P.editor_region(bb.preset.name))
    bb.requires_grad_(False)
    identity = bb.identity()  # recorded with the adapter: it loads only on this backbone
    if cfg.frozen_dtype != "float32":
        bb.transformer.to(
            getattr(torch, cfg.frozen_dtype)
        )  # the frozen base; the adapters are cast to fp32 by the loop
    spec = AD.inject(bb.transformer, cfg.adapter, rank=cfg.rank)
    train_cases, val_cases = sft_data(cfg, loop.seed)
    prompts: list[str] = []
    bank, val = (
        bank_of(bb, train_cases, prompts, cfg.prompt, cfg.region),
        bank_of(bb, val_cases, prompts, cfg.prompt, cfg.region),
    )
    val_trips = val_cases[: cfg.val_images]
    n_bank = len(train_cases)
    alpha = [p for n, p in bb.transformer.named_parameters() if p.requires_grad and "lora_freq_alpha" in n]
    rest = [p for n, p in bb.transformer.named_parameters() if p.requires_grad and "lora_freq_alpha" not in n]
    groups = [dict(params=rest)] + ([dict(params=alpha, freeze_at=cfg.alpha_freeze_step)] if alpha else [])
    with (
        torch.no_grad()
    ):  # every prompt encoded once (the text side is frozen); an unknown one fails here, before training
        enc = [bb.encode_prompt(p, batch=1) for p in prompts]
        embeds = (torch.cat([e[0] for e in enc]), torch.cat([e[1] for e in enc]), enc[0][2])
    if free_text_encoders:  # a pipeline backbone: T5 + CLIP (~9.5 GB in bf16) are not needed past this point
        bb.cache_prompts(prompts, free=True)

    def loss_fn(s: Step):
        g = cfg.batch * s.world  # the global batch, identical on every rank; each keeps its share
        idx = torch.from_numpy(s.rng.choice(n_bank, g, replace=n_bank < g))
        t = L.sample_t(s.rng, g)
        eps = torch.from_numpy(s.rng.standard_normal((g, *bank["target"].shape[1:]))).float()
        batch = {k: s.shard(v[idx]) for k, v in bank.items()}
        return sft_loss(s.model, batch, cfg, s.shard(t), s.shard(eps), embeds)

    def eval_fn(step: int) -> dict:
        g = np.random.default_rng(0)
        t = torch.full((val["target"].shape[0],), 0.5)
        eps = torch.from_numpy(g.standard_normal(val["target"].shape)).float()
        out = dict(val_loss=float(sft_loss(bb, val, cfg, t, eps, embeds)[0]))
        if val_trips:
            rows, imgs = evaluate_refiner(
                bb,
                val_trips,
                cfg.val_steps,
                seed=0,
                prompt=cfg.prompt,
                return_images=True,
                progress=False,
                region=cfg.region,
            )
            out["val_region_psnr"] = float(np.mean([r["region_psnr"] for r in rows]))
            if main_process():  # under FSDP every rank evaluates (collective forward); one writes
                save_val_grid(
                    val_trips,
                    imgs,
                    Path(loop.out_dir) / "val" / f"step_{step:06d}.png",
                    f"step {step}: val region PSNR {out['val_region_psnr']:.2f} dB",
                )
        return out

    state = run_loop(
        loop, bb, loss_fn, eval_fn, param_groups=groups, run_config=dict(sft=asdict(cfg), preset=bb.preset.name)
    )
    adapter = AD.adapter_state(bb.transformer)  # whole on every rank (gathered from the shards under FSDP)
    if state["main"]:
        provenance = dict(
            steps=state["step"],
            seed=loop.seed,
            lr=loop.lr,
            ema=loop.ema,
            git=git_commit(),
            mixed_precision=loop.mixed_precision,
            val=state["evals"][-1] if state["evals"] else None,
        )
        AD.save(
            bb.transformer,
            dict(spec, **identity, sft=asdict(cfg), training=provenance),
            Path(loop.out_dir) / "adapter",
            adapter,
        )
        write_json(dict(history=state["history"], evals=state["evals"]), Path(loop.out_dir) / "train_state.json")
    return state


def save_val_grid(trips: list, outputs: list[torch.Tensor], path: Path, title: str = "") -> Path:
    """One PNG: a row per val triplet (LRGI up, HRRI, output, HRGT) - the images the training log points at."""
    import matplotlib.pyplot as plt  # heavy: imported where used

    from . import viz  # pulls matplotlib: imported where used

    rows = [[t.draft, t.reference, y, t.target] for t, y in zip(trips, outputs)]
    fig = viz.grid(rows, ["LRGI (bicubic up)", "HRRI", "output", "HRGT"], size=1.4)
    fig.suptitle(title, fontsize=8, y=1.0)
    out = viz.save(fig, path.stem, path.parent)
    plt.close(fig)
    return out


@torch.no_grad()
def evaluate_refiner(
    bb: M.Backbone,
    trips: list,
    steps: int = 8,
    seed: int = 0,
    prompt: str = "refine",
    return_images: bool = False,
    progress: bool = True,
    region: str = "none",
):
    """Sample HRGT from [draft, HRRI] with the sampler; per case labkit.metrics.case_row of the output and,
    prefixed 'draft_', of the draft itself (the no-model baseline); the output images when return_images."""
    rows, images = [], []
    for i, t in enumerate(tqdm(trips, desc="evaluate", leave=False, disable=not progress, mininterval=2)):
        s = t.target.shape[-1]
        ctx = [bb.encode(x[None]) for x in F_.region_contexts(t.draft, t.mask, [t.reference], region)]
        z = sample(
            bb,
            ctx,
            getattr(t, "prompt", None) or prompt,
            shape=(1, 16, s // bb.factor, s // bb.factor),
            steps=steps,
            generator=torch.Generator().manual_seed(seed + i),
        )
        y = bb.decode(z)[0].float().cpu()
        rows.append(
            dict(
                case=i,
                content=t.meta.get("content", "user"),
                **case_row(y, t.target, t.mask, t.draft),
                **case_row(t.draft, t.target, t.mask, prefix="draft_"),
            )
        )
        images.append(y)
    return (rows, images) if return_images else rows
