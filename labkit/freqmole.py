"""FreqMoLE (RefGC-SR2): two LoRA experts per adapted linear, ΔW = α·ΔW_LF + (1 − α)·ΔW_HF, with α
initialised from a depth prior (large in shallow blocks, small in deep ones) and learnable.

Built on peft's extension point (`LoraConfig._register_custom_module`): `FreqMoLELinear` subclasses
peft's LoRA `Linear`; the LF expert is peft's own `lora_A`/`lora_B`, the HF expert and α are extra
adapter layers. The plain-LoRA baseline is peft's LoRA on the same targets (`inject(..., kind="lora")`).
Gap choices (the paper does not say): α is one scalar per adapted linear (initialised to its block's
prior; `alpha_by_block` reports block means), both experts share the rank.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file, save_file
from torch import nn

from .util import atomic_dir, write_json

# The linears diffusers' Kontext LoRA script adapts, anchored on the block lists (the model's final
# proj_out and the embedders are never matched).
TARGETS = (
    r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
    r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)$"
)
ADAPTER = "default"


class FreqMoLELinear(LoraLinear):
    """peft LoRA Linear with a second (HF) expert and a learnable mixing scalar α (the LF expert's share)."""

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_A_hf", "lora_B_hf", "lora_freq_alpha")

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if not hasattr(self, "lora_A_hf"):  # the extra adapter layers must exist before peft fills its own
            self.lora_A_hf, self.lora_B_hf, self.lora_freq_alpha = nn.ModuleDict(), nn.ModuleDict(), nn.ParameterDict()
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        base = self.get_base_layer()
        a = nn.Linear(base.in_features, r, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as peft initialises lora_A
        b = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(b.weight)  # B = 0: the wrapped model is unchanged at step 0
        w = base.weight
        self.lora_A_hf[adapter_name] = a.to(w.device, w.dtype)
        self.lora_B_hf[adapter_name] = b.to(w.device, w.dtype)
        self.lora_freq_alpha[adapter_name] = nn.Parameter(
            torch.full((1,), 0.5, device=w.device)
        )  # (1,): FSDP shards no scalars

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """α·B_LF A_LF + (1 − α)·B_HF A_HF, times the LoRA scaling (used by merge/unmerge)."""
        al = self.lora_freq_alpha[adapter]
        lf = self.lora_B[adapter].weight @ self.lora_A[adapter].weight
        hf = self.lora_B_hf[adapter].weight @ self.lora_A_hf[adapter].weight
        return ((al * lf + (1 - al) * hf) * self.scaling[adapter]).to(self.get_base_layer().weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            xd = self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))
            al = self.lora_freq_alpha[name]
            # both experts in two matmuls: [A_LF; A_HF] (2r, in), then [α·B_LF, (1 − α)·B_HF] (out, 2r)
            a = torch.cat([self.lora_A[name].weight, self.lora_A_hf[name].weight], 0)
            b = torch.cat([al * self.lora_B[name].weight, (1 - al) * self.lora_B_hf[name].weight], 1)
            delta = nn.functional.linear(nn.functional.linear(xd, a), b)
            result = result + (delta * self.scaling[name]).to(result.dtype)
        return result


def depth_prior(depth: float, high: float = 0.9, low: float = 0.1, gamma: float = 1.0) -> float:
    """α at a depth fraction in [0, 1]: high in shallow blocks, low in deep ones (gamma shapes the fall)."""
    return high - (high - low) * depth**gamma


def block_depths(transformer) -> dict[str, float]:
    """Depth fraction of every block, double-stream first: 'transformer_blocks.3' -> 3 / (L - 1)."""
    names = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))
    ]
    return {n: i / max(1, len(names) - 1) for i, n in enumerate(names)}


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
        depths = block_depths(transformer)
        with torch.no_grad():
            for name, mod in transformer.named_modules():
                if isinstance(mod, FreqMoLELinear):
                    blk = re.match(r"^(\w+\.\d+)\.", name).group(1)
                    mod.lora_freq_alpha[ADAPTER].fill_(depth_prior(depths[blk], **(prior or {})))
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


def alpha_by_block(transformer) -> dict[str, float]:
    """Mean α of the FreqMoLE linears of each block."""
    out: dict[str, list[float]] = {}
    for name, mod in transformer.named_modules():
        if isinstance(mod, FreqMoLELinear):
            out.setdefault(re.match(r"^(\w+\.\d+)\.", name).group(1), []).append(
                float(mod.lora_freq_alpha[ADAPTER].detach())
            )
    return {k: sum(v) / len(v) for k, v in out.items()}


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
        "save adapters with labkit.freqmole.save, or train one with `labkit train sft --out DIR`"
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
