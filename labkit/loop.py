"""THE training loop: the only module that touches accelerate's `Accelerator`.

Recipes (mini VAE and editor, adapter SFT, GRPO) give it one `nn.Module` that holds the trainable
weights and a `loss_fn(step: Step) -> (loss, logs)` that computes the loss *through `step.model`*, the
prepared module (DDP-wrapped under `accelerate launch --num_processes N`, so gradients are synchronised).
Every rank draws the same global batch from `step.rng` and keeps its share with `step.shard(...)`, so N
processes with batch B train exactly like one process with batch N·B.

What the loop does: AdamW + warmup/cosine (per parameter group, so a group can freeze at a step and that
schedule resumes too), autocast only around the loss, gradient clipping, optional gradient
checkpointing and EMA (diffusers' EMAModel), a non-finite loss or gradient stops the run with
`NonFiniteError` naming the step and the quantity (before anything is saved), evaluation on the main
process with the EMA weights swapped in, metrics CSV, checkpoints with `Accelerator.save_state` (the
trainable weights as safetensors, the rest as JSON or weights_only torch files) written to a temporary
folder and renamed into place, exact resume, and a run folder that refuses another config unless
`fresh`. Trainable parameters are kept fp32; after the loop no autocast wrapper is left on the module.
With `fsdp` (or an accelerate config with distributed_type FSDP) under N processes the transformer is sharded
with FSDP2, its blocks as units: through accelerate's plugin on GPUs, through torch's fully_shard on CPU
processes (accelerate ignores the plugin there); checkpoints hold the gathered trainable weights and each
rank's optimizer shard.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .util import (  # noqa: F401 (re-exported)
    REPO,
    TRACKERS,
    NonFiniteError,
    RunConfigMismatch,
    atomic_save,
    dict_diff,
    labkit_wrote,
    seed_everything,
    write_json,
)

RUNS = REPO / "runs"
VOLATILE = (
    "out_dir",
    "progress",
    "max_minutes",
    "fresh",
    "ckpt_every",
    "eval_every",
    "report_to",
)  # may change on resume


@dataclass
class LoopConfig:
    """Optimisation settings shared by every labkit training recipe."""

    steps: int = 1000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup: int = 100
    min_lr_frac: float = 0.05
    clip: float = 1.0  # max gradient norm (0 = no clipping; the norm is still checked for NaN/inf)
    grad_accum: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False
    ckpt_every: int = 200
    eval_every: int = 200
    max_minutes: float | None = None  # stop early (and save) when the wall-clock budget is spent
    mixed_precision: str = "auto"  # no | bf16 | fp16 | auto (bf16 on CUDA or a CPU with native bf16, else no)
    ema: float = 0.0  # EMA decay of the trained weights (0 = off); evals and the final weights use the EMA
    seed: int = 0
    out_dir: str = str(RUNS / "scratch")
    fresh: bool = False  # delete an earlier run in out_dir instead of resuming it
    progress: bool = True
    fsdp: bool = False  # shard the transformer (FSDP2, blocks as units) across processes; LoRA/FreqMoLE train
    report_to: str = "none"  # an experiment tracker through accelerate (TRACKERS): losses, val metrics and images

    def check(self) -> LoopConfig:
        """Refuse settings no run can use, before anything is written (a usage error naming the fix)."""
        bad = [
            f"{k}={v!r}"
            for k, v, ok in (
                ("steps", self.steps, isinstance(self.steps, int) and self.steps >= 1),
                ("lr", self.lr, math.isfinite(self.lr) and self.lr > 0),
                ("grad_accum", self.grad_accum, self.grad_accum >= 1),
                ("ema", self.ema, math.isfinite(self.ema) and 0 <= self.ema < 1),
                ("clip", self.clip, math.isfinite(self.clip) and self.clip >= 0),
                ("weight_decay", self.weight_decay, math.isfinite(self.weight_decay) and self.weight_decay >= 0),
                ("warmup", self.warmup, self.warmup >= 0),
                ("fsdp with ema", self.ema, not (self.fsdp and self.ema)),
                ("report_to", self.report_to, self.report_to in TRACKERS),
            )
            if not ok
        ]
        if bad:
            raise ValueError(
                f"bad training settings: {', '.join(bad)} (steps and grad_accum >= 1, lr > 0 and finite, "
                f"0 <= ema < 1, clip/weight_decay/warmup >= 0, no EMA under fsdp, report_to one of {TRACKERS})"
            )
        return self


@dataclass
class Step:
    """What a recipe's loss_fn gets: the step, the data RNG (identical on every rank), the prepared module."""

    step: int  # 0-based optimizer step
    rng: np.random.Generator
    model: nn.Module  # compute the loss through this (DDP / autocast as prepared), not the raw module
    rank: int = 0
    world: int = 1
    micro: int = 0  # micro-batch index within the step (grad_accum > 1)

    def shard(self, x):
        """This rank's share of a global batch (tensor, array or list along dim 0)."""
        if self.world == 1:
            return x
        n = len(x)
        if n % self.world:
            raise ValueError(f"global batch {n} is not divisible by {self.world} processes")
        k = n // self.world
        return x[self.rank * k : (self.rank + 1) * k]


def resolve_precision(mp: str) -> str:
    """'auto' -> 'bf16' where it is fast (CUDA, or CPUs with native bf16), else 'no'; others unchanged.

    Measured here: on an AVX2-only CPU, bf16 autocast made a VAE step 10x slower than fp32."""
    if mp not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be auto | no | bf16 | fp16, got {mp!r}")
    if mp != "auto":
        return mp
    if torch.cuda.is_available():
        return "bf16"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def save_optimizer(model: torch.nn.Module, opt, sched, folder: Path, main: bool) -> None:
    """The optimizer of a (possibly FSDP-sharded) model through torch.distributed.checkpoint's get_state_dict,
    gathered whole on CPU (a collective: every rank calls it): its tensors as optimizer.safetensors (keyed
    '<parameter>/<state>'), the param groups and the schedule as optimizer.json; no pickles."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return
    tensors = {f"{name}/{k}": v.detach().cpu().contiguous() for name, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    write_json(dict(param_groups=sd["param_groups"], scheduler=sched.state_dict()), Path(folder) / "optimizer.json")


def load_optimizer(model: torch.nn.Module, opt, sched, folder: Path) -> None:
    """Back from save_optimizer: every rank reads the whole state and set_state_dict keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict[str, dict] = {}
    for key, v in load_file(str(Path(folder) / "optimizer.safetensors")).items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    meta = json.loads((Path(folder) / "optimizer.json").read_text())
    sd = dict(state=state, param_groups=meta["param_groups"])
    set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    sched.load_state_dict(meta["scheduler"])


def lr_lambda(cfg: LoopConfig, freeze_at: int | None = None) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_lr_frac; 0 from step freeze_at on (a frozen group)."""

    def f(step: int) -> float:
        if freeze_at is not None and freeze_at >= 0 and step >= freeze_at:
            return 0.0
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def _finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x, dtype=torch.float64)).all())


def check_run_folder(out: str | Path) -> None:
    """Refuse a file, or a non-empty folder labkit did not write, as a run's folder (before any work)."""
    out = Path(out)
    if out.is_file():
        raise FileExistsError(f"{out} is a file: give a folder for the run (checkpoints, metrics, the adapter)")
    own = [p for p in out.iterdir() if not p.match("bank_*.safetensors")] if out.is_dir() else []  # banks: labkit's
    if own and not labkit_wrote(out):
        raise RunConfigMismatch(
            f"{out} is not empty and labkit did not write it (no run.json): choose another output folder "
            "(--fresh only replaces labkit's own run folders)"
        )


def _check_run_dir(out: Path, config: dict, fresh: bool, main: bool) -> None:
    """check_run_folder, then refuse a run made with another config; `fresh` wipes the folder's run state first."""
    run_json = out / "run.json"
    check_run_folder(out)
    if fresh and main:
        for name in ("ckpt", "ckpt.tmp", "ckpt.old", "run.json", "metrics.csv"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if run_json.exists() and not fresh:
        old = json.loads(run_json.read_text())
        new = json.loads(json.dumps(config, default=str))
        if old != new:
            diff = dict_diff(old, new)
            raise RunConfigMismatch(
                f"{out} holds a run with another configuration ({diff}); pass --fresh (fresh=True) "
                "to start over there, or choose another output folder"
            )


def _latest_ckpt(out: Path) -> Path | None:
    """The complete checkpoint folder (ckpt, or ckpt.old if a kill hit between the two renames)."""
    for name in ("ckpt", "ckpt.old"):
        if (out / name / "loop_state.json").exists():
            return out / name
    return None


def block_classes(model: nn.Module) -> set[str]:
    """The transformer-block class names FSDP wraps as units: every diffusers model's `_no_split_modules`."""
    return {c for m in model.modules() for c in (getattr(m, "_no_split_modules", None) or [])}


def shard_with_torch(model: nn.Module, world: int) -> list[nn.Module]:
    """FSDP2 by hand, as accelerate's plugin does it on GPUs (it ignores the plugin on CPU processes): torch's
    fully_shard on every transformer block, then on each model that owns blocks (its root). Frozen and
    trainable weights are sharded alike; only parameters inside those roots may train. Returns the roots."""
    names = block_classes(model)
    roots = [m for m in model.modules() if getattr(m, "_no_split_modules", None)]
    if not roots:
        raise ValueError("fsdp=True needs a diffusers transformer (a module with _no_split_modules) inside the model")
    inside = {id(p) for r in roots for p in r.parameters()}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if stray:
        raise ValueError(f"fsdp=True shards the transformer only; these trainable weights live outside it: {stray[:3]}")
    # heavy (torch.distributed's FSDP: ~0.8 s at import, only for --fsdp): imported where used
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
    for r in roots:
        for m in r.modules():
            if type(m).__name__ in names:
                fully_shard(m, mesh=mesh)
        fully_shard(r, mesh=mesh)
    return roots


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A (possibly FSDP-sharded DTensor) tensor gathered whole; collective under FSDP: every rank calls it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Trainer:
    """run_loop's phases: set-up (__init__), step, evaluate, save/load, close. See the module docstring."""

    def __init__(
        self,
        cfg: LoopConfig,
        model: nn.Module,
        loss_fn: Callable,
        eval_fn: Callable | None,
        param_groups: list[dict] | None,
        run_config: dict | None,
    ):
        if (
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        ):  # an accelerate config with distributed_type: FSDP
            cfg = replace(cfg, fsdp=True)
        self.cfg, self.model, self.loss_fn, self.eval_fn = cfg.check(), model, loss_fn, eval_fn
        self.acc = acc = self._accelerator(model)
        self.main, self.out = acc.is_main_process, Path(cfg.out_dir)
        self.sharded = cfg.fsdp and acc.num_processes > 1  # FSDP: the transformer's weights are split across ranks
        self.by_hand = (
            self.sharded and acc.distributed_type.name != "FSDP"
        )  # CPU processes: accelerate ignored the plugin
        config = dict(
            loop={k: v for k, v in asdict(cfg).items() if k not in VOLATILE},
            recipe=run_config or {},
            world=acc.num_processes,
        )
        _check_run_dir(self.out, config, cfg.fresh, self.main)
        acc.wait_for_everyone()
        if self.main:
            write_json(config, self.out / "run.json")
        if cfg.report_to != "none":  # only now: the folder is known to be labkit's (_check_run_dir)
            flat = {f"{k}.{n}": v for k, d in config.items() if isinstance(d, dict) for n, v in d.items()}
            acc.init_trackers(
                "tracker", config={k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
            )
        seed_everything(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)  # the data RNG: the same stream on every rank (Step.shard splits it)
        self._build_optimizer(model, param_groups)
        self.state = dict(step=0, history=[], evals=[], seconds=0.0)
        ckpt = _latest_ckpt(self.out)
        if ckpt is not None:
            self.load(ckpt)
        self.t0, self.start = time.time(), self.state["seconds"]
        self.bar = tqdm(
            total=cfg.steps,
            initial=self.state["step"],
            disable=not (cfg.progress and self.main),
            desc=self.out.name,
            mininterval=5,
        )
        self.inner.train()

    def _accelerator(self, model: nn.Module):
        """The Accelerator: precision, accumulation, and (fsdp) accelerate's FSDP2 plugin with the blocks as units."""
        from accelerate import Accelerator, FullyShardedDataParallelPlugin  # heavy: imported where used
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import ProjectConfiguration

        # one process may train several models at different precisions (notebooks, tests)
        AcceleratorState._reset_state()
        GradientState._reset_state()
        plugin = None
        if self.cfg.fsdp:
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=sorted(block_classes(model)),
                reshard_after_forward=True,
                state_dict_type="FULL_STATE_DICT",
            )
        return Accelerator(
            mixed_precision=resolve_precision(self.cfg.mixed_precision),
            cpu=not torch.cuda.is_available(),
            gradient_accumulation_steps=self.cfg.grad_accum,
            step_scheduler_with_optimizer=False,
            fsdp_plugin=plugin,
            log_with=None if self.cfg.report_to == "none" else self.cfg.report_to,
            project_config=ProjectConfiguration(
                project_dir=self.cfg.out_dir, logging_dir=str(Path(self.cfg.out_dir) / "logs")
            ),
        )

    def _build_optimizer(self, model: nn.Module, param_groups: list[dict] | None) -> None:
        """fp32 trainable weights, (FSDP) sharding, AdamW + schedule per group, EMA, checkpointing, prepare."""
        from diffusers.training_utils import cast_training_params  # heavy: imported where used

        cfg, acc = self.cfg, self.acc
        cast_training_params(
            model, torch.float32
        )  # trainable weights fp32; frozen ones keep their dtype (bf16 is fine)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [
            dict(g, names=[names[id(p)] for p in g["params"]])
            for g in param_groups or [dict(params=[p for p in model.parameters() if p.requires_grad])]
        ]
        if self.by_hand:
            shard_with_torch(
                model, acc.num_processes
            )  # replaces the parameters by DTensor shards: re-found by name below
        by_name = dict(model.named_parameters())
        self.named = [(n, p) for n, p in by_name.items() if p.requires_grad]
        if not self.named:
            raise ValueError(
                "no trainable parameters: set requires_grad on the weights to train (or inject an adapter)"
            )
        self.params = [p for _, p in self.named]
        opt = torch.optim.AdamW(
            [dict(params=[by_name[n] for n in g["names"]]) for g in groups],
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda(cfg, g.get("freeze_at")) for g in groups])
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema, use_ema_warmup=False, foreach=False)
        self.gc_modules = (
            [m for m in model.modules() if getattr(m, "_supports_gradient_checkpointing", False)]
            if cfg.gradient_checkpointing
            else []
        )
        for m in self.gc_modules:
            m.enable_gradient_checkpointing()
        if self.by_hand:  # no DDP around a sharded model; optimizer and schedule are checkpointed per rank (save)
            self.prepared, self.opt, self.sched = model, opt, sched
        else:
            self.prepared, self.opt, self.sched = acc.prepare(model, opt, sched)
        self.inner = acc.unwrap_model(self.prepared, keep_fp32_wrapper=False)
        self.inner.__dict__.pop("forward", None)  # autocast lives only in the loop's own context, never on the module
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self._full: dict = {}

    # ---------------------------------------------------------------- one optimizer step
    def step(self) -> bool:
        """One optimizer step (grad_accum micro-batches); True when the run is done."""
        cfg, acc, state = self.cfg, self.acc, self.state
        step = state["step"]
        for micro in range(cfg.grad_accum):
            with acc.accumulate(self.prepared):
                with acc.autocast():
                    loss, logs = self.loss_fn(
                        Step(step, self.rng, self.prepared, acc.process_index, acc.num_processes, micro)
                    )
                acc.backward(loss)
        gn = full_tensor(acc.clip_grad_norm_(self.params, cfg.clip if cfg.clip else float("inf")))
        if not _finite(loss.detach()) or not _finite(gn):
            what = f"loss is {float(loss.detach())}" if not _finite(loss.detach()) else f"gradient norm is {float(gn)}"
            raise NonFiniteError(
                f"step {step + 1}: {what} (nothing saved for this step; lower the learning rate "
                f"(now {cfg.lr:g}) or check the data)"
            )
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        loss_mean = (
            float(acc.reduce(loss.detach().float(), reduction="mean"))
            if acc.num_processes > 1
            else float(loss.detach())
        )
        state["step"] += 1
        state["seconds"] = self.start + time.time() - self.t0
        state["history"].append(
            dict(
                step=state["step"],
                loss=loss_mean,
                grad_norm=float(gn),
                lr=self.sched.get_last_lr()[0],
                seconds=round(state["seconds"], 2),
                **{k: float(v) for k, v in logs.items()},
            )
        )
        if cfg.report_to != "none":
            last = state["history"][-1]
            acc.log({f"train/{k}": v for k, v in last.items() if k not in ("step", "seconds")}, step=state["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_mean:.4f}", refresh=False)
        return state["step"] >= cfg.steps or bool(cfg.max_minutes and state["seconds"] > 60 * cfg.max_minutes)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> None:
        """eval_fn under no_grad with the EMA weights swapped in; on the main process (on every rank under FSDP,
        whose forward is collective; the main one records). A non-finite number stops the run."""
        from accelerate.utils import broadcast_object_list

        msg = None
        if self.main or self.sharded:
            self.inner.eval()
            if self.ema is not None:
                self.ema.store(self.params), self.ema.copy_to(self.params)
            with torch.no_grad():
                ev = self.eval_fn(self.state["step"])
            if self.ema is not None:
                self.ema.restore(self.params)
            self.inner.train()
            bad = [k for k, v in ev.items() if isinstance(v, (int, float)) and not _finite(v)]
            msg = f"step {self.state['step']}: evaluation {bad[0]} is {ev[bad[0]]}" if bad else None
            if not msg and self.main:
                self.state["evals"].append(dict(step=self.state["step"], seconds=round(self.state["seconds"], 1), **ev))
                self.bar.write(f"[{self.out.name}] step {self.state['step']}: {_fmt(ev)}")
                self.track_eval(ev)
        msg = broadcast_object_list([msg])[0] if self.acc.num_processes > 1 else msg
        if msg:
            raise NonFiniteError(msg + " (nothing saved for this step; lower the learning rate or check the data)")

    def track_eval(self, ev: dict) -> None:
        """Val metrics to the tracker, and the val image the recipe saved for this step (out/val/step_*.png)."""
        if self.cfg.report_to == "none":
            return
        step = self.state["step"]
        self.acc.log({f"val/{k}": v for k, v in ev.items() if isinstance(v, (int, float))}, step=step)
        png = self.out / "val" / f"step_{step:06d}.png"
        if png.exists():
            img = np.asarray(Image.open(png).convert("RGB"))[None]  # (1, H, W, 3)
            for t in self.acc.trackers:
                if t.name == "tensorboard":
                    t.log_images({"val/samples": img}, step=step, dataformats="NHWC")
                else:
                    t.log_images({"val/samples": list(img)}, step=step)

    # ---------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights whole, on CPU (gathered from every rank under FSDP: a collective call)."""
        return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in self.named}

    def _save_hook(self, models, weights, output_dir):  # only the trainable weights, as safetensors

        if self.main:
            save_file(self._full, str(Path(output_dir) / "trainable.safetensors"))
        weights.clear()

    def _load_hook(self, models, input_dir):
        sd = load_file(str(Path(input_dir) / "trainable.safetensors"))
        with torch.no_grad():
            for n, p in self.named:
                src = sd[n].to(p.device, p.dtype)
                if hasattr(p, "device_mesh"):  # a DTensor shard: this rank's piece of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src, p.device_mesh, p.placements)
                p.copy_(src)
        models.clear()

    def save(self) -> None:
        """A checkpoint written to ckpt.tmp and renamed into place (ckpt.old kept until then)."""
        out, tmp, acc = self.out, self.out / "ckpt.tmp", self.acc
        if self.main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        self._full = self.trainable_state()  # collective under FSDP
        acc.save_state(str(tmp))
        if self.by_hand:  # the sharded optimizer gathered whole (collective), the schedule: no pickles
            save_optimizer(self.prepared, self.opt, self.sched, tmp, self.main)
        acc.wait_for_everyone()
        if self.main:
            write_json(dict(self.state, data_rng=self.rng.bit_generator.state), tmp / "loop_state.json")
            if self.ema is not None:
                e = self.ema.state_dict()
                save_file(
                    {str(i): t.detach().cpu().contiguous() for i, t in enumerate(e.pop("shadow_params"))},
                    str(tmp / "ema.safetensors"),
                )
                write_json(e, tmp / "ema.json")
            cur, old = out / "ckpt", out / "ckpt.old"
            if old.exists():
                shutil.rmtree(old)
            if cur.exists():
                cur.rename(old)
            tmp.rename(cur)
            if old.exists():
                shutil.rmtree(old)
            write_csv(out / "metrics.csv", self.state["history"])
        self._full = {}
        acc.wait_for_everyone()

    def load(self, ckpt: Path) -> None:
        """Exact resume: weights, optimizer, schedule, RNGs, EMA, data RNG, history."""
        self.acc.load_state(str(ckpt))
        if self.by_hand:
            load_optimizer(self.prepared, self.opt, self.sched, ckpt)
        saved = json.loads((ckpt / "loop_state.json").read_text())
        self.rng.bit_generator.state = saved.pop("data_rng")
        self.state.update(saved)
        if self.ema is not None:
            e = json.loads((ckpt / "ema.json").read_text())
            sp = load_file(str(ckpt / "ema.safetensors"))
            self.ema.load_state_dict(dict(e, shadow_params=[sp[str(i)] for i in range(len(sp))]))

    def close(self) -> None:
        """Undo what the loop put on the module (checkpointing, autocast wrappers); free accelerate's references."""
        self.bar.close()
        for m in self.gc_modules:
            m.disable_gradient_checkpointing()
        self.inner.__dict__.pop("forward", None)
        self.inner.__dict__.pop("_original_forward", None)
        if self.cfg.report_to != "none":
            self.acc.end_training()  # flushes and closes the tracker's files
        self.acc.free_memory()


def run_loop(
    cfg: LoopConfig,
    model: nn.Module,
    loss_fn: Callable[[Step], tuple[torch.Tensor, dict]],
    eval_fn: Callable[[int], dict] | None = None,
    param_groups: list[dict] | None = None,
    run_config: dict | None = None,
) -> dict:
    """Train the trainable parameters of `model`; resumes from out_dir/ckpt when present (same config).

    param_groups: [dict(params=[...], freeze_at=N or None), ...] (default: one group of every trainable
    parameter). eval_fn(step) -> dict of numbers runs every eval_every steps on the main process under
    no_grad (EMA weights swapped in when cfg.ema > 0). run_config: the recipe's settings, stored in
    out_dir/run.json with the loop's and compared on resume. Returns dict(step, history, evals, seconds,
    main) where main says whether this process is the one that writes files. With cfg.fsdp under N processes
    the model stays sharded afterwards: gather what you keep with `full_tensor` on every rank."""
    t = Trainer(cfg, model, loss_fn, eval_fn, param_groups, run_config)
    try:
        while t.state["step"] < cfg.steps:
            done = t.step()
            if eval_fn and (t.state["step"] % cfg.eval_every == 0 or done):
                t.evaluate()
            if t.state["step"] % cfg.ckpt_every == 0 or done:
                t.save()
            if done:
                break
    finally:
        t.close()
    if t.ema is not None:
        t.ema.copy_to(t.params)
    t.inner.eval()
    engine = None if not t.sharded else "torch" if t.by_hand else "accelerate"  # who applied FSDP2
    return dict(t.state, main=t.main, sharded=t.sharded, fsdp_engine=engine)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts -> CSV (union of keys), atomically."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def w(p):
        with open(p, "w", newline="") as f:
            wr = csv.DictWriter(f, keys)
            wr.writeheader()
            wr.writerows(rows)

    atomic_save(w, path)
