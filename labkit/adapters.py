"""Adapters on the frozen transformer through peft: FreqMoLE (`labkit.freqmole`) or plain LoRA on the same
targets; inject, save as a folder (adapter.safetensors + adapter.json), load strictly (refusing another
backbone), merge. Imported lazily by the recipes and `labkit.editor`: peft is a heavy dependency."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model  # heavy dependency: this module is imported lazily
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file, save_file
from torch import nn

from .freqmole import ADAPTER, FreqMoLELinear, init_alpha
from .util import atomic_dir, write_json

# The linears diffusers' Kontext LoRA script adapts, anchored on the block lists (the model's final
# proj_out and the embedders are never matched).
TARGETS = (
    r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
    r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)$"
)


def config(
    kind: str = "freqmole", rank: int = 8, alpha: float | None = None, dropout: float = 0.0, targets: str = TARGETS
) -> LoraConfig:
    """LoraConfig for the chosen adapter kind; FreqMoLE registers its custom Linear (re-done on every load)."""
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=targets, init_lora_weights=True
    )
    if kind == "freqmole":
        cfg._register_custom_module({nn.Linear: FreqMoLELinear})
    elif kind != "lora":
        raise ValueError(f"unknown adapter kind {kind!r}; use 'freqmole' or 'lora'")
    return cfg


def inject(
    transformer,
    kind: str = "freqmole",
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    prior: dict | None = None,
) -> dict:
    """Add FreqMoLE (or plain LoRA) adapters to every double- and single-stream block; freeze the base.

    Returns the adapter spec (saved next to the weights so loading rebuilds the same modules)."""
    spec = dict(kind=kind, rank=rank, alpha=alpha or rank, dropout=dropout, prior=prior or {})
    inject_adapter_in_model(config(kind, rank, alpha, dropout), transformer, adapter_name=ADAPTER)
    for n, p in transformer.named_parameters():
        p.requires_grad_("lora_" in n)
    if kind == "freqmole":
        init_alpha(transformer, prior)
    return spec


def adapter_state(transformer) -> dict[str, torch.Tensor]:
    """All adapter tensors (names containing 'lora_'), whole: FSDP-sharded ones are gathered (a collective call
    then, made on every rank)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
        for k, v in transformer.state_dict().items()
        if "lora_" in k
    }


def trainable_count(transformer) -> int:
    """Number of trainable parameters (the adapters)."""
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def save(transformer, spec: dict, folder: str | os.PathLike, state: dict | None = None) -> Path:
    """The adapter folder: adapter.safetensors + adapter.json (the spec), written together (atomic_dir).
    state: the adapter tensors already gathered (adapter_state; under FSDP every rank gathers, one saves)."""
    sd = adapter_state(transformer) if state is None else state
    with atomic_dir(folder) as tmp:
        save_file(sd, str(tmp / "adapter.safetensors"))
        write_json(spec, tmp / "adapter.json")
    return Path(folder)


def adapter_folder(folder: str | os.PathLike) -> Path:
    """The folder holding adapter.json: `folder` itself, or the `adapter/` a training run writes into its --out."""
    folder = Path(folder)
    for p in (folder, folder / "adapter"):
        if (p / "adapter.json").exists() and (p / "adapter.safetensors").exists():
            return p
    raise FileNotFoundError(
        f"no adapter (adapter.json + adapter.safetensors) in {folder} or {folder / 'adapter'}: "
        "save adapters with labkit.adapters.save, or train one with `labkit train sft --out DIR`"
    )


def load(transformer, folder: str | os.PathLike, identity: dict | None = None) -> dict:
    """Re-inject the adapters described by adapter.json (custom module re-registered) and load the weights
    strictly: a FreqMoLE file loaded into plain LoRA modules would be an error, not silently dropped.
    identity (Backbone.identity()): refuse, in one line, an adapter trained on another backbone."""
    folder = adapter_folder(folder)
    spec = json.loads((folder / "adapter.json").read_text())
    if (
        identity
        and spec.get("model_hash")
        and (spec.get("preset"), spec.get("model_hash")) != (identity["preset"], identity["model_hash"])
    ):
        raise ValueError(
            f"adapter {folder} was trained on preset {spec.get('preset')!r} (model {spec['model_hash']}), but "
            "this backbone "
            f"is {identity['preset']!r} (model {identity['model_hash']}): load it on that backbone or retrain "
            "it on this one "
            f"(labkit train sft --preset {identity['preset']} ...)"
        )
    inject(transformer, spec["kind"], spec["rank"], spec["alpha"], spec["dropout"], spec.get("prior"))
    sd = load_file(folder / "adapter.safetensors")
    mine = adapter_state(transformer)
    sd = {
        k: v.reshape(1) if "lora_freq_alpha" in k and v.ndim == 0 else v for k, v in sd.items()
    }  # files from before α was (1,)
    if set(sd) != set(mine) or any(sd[k].shape != mine[k].shape for k in sd):
        raise ValueError(
            f"adapter file and modules disagree ({len(set(sd) ^ set(mine))} tensor names differ, "
            f"e.g. {sorted(set(sd) ^ set(mine))[:2]}): {folder} was made for another model "
            f"({spec.get('preset', 'preset not recorded')}); load it on the backbone it was trained on"
        )
    transformer.load_state_dict(sd, strict=False)
    return spec


def merge(transformer) -> None:
    """Fold every adapter into its base weight (inference); outputs are unchanged."""
    for mod in transformer.modules():
        if isinstance(mod, LoraLinear):
            mod.merge()
