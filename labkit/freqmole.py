"""FreqMoLE (RefGC-SR2): two LoRA experts per adapted linear, ΔW = α·ΔW_LF + (1 − α)·ΔW_HF, with α
initialised from a depth prior (large in shallow blocks, small in deep ones) and learnable.

Built on peft's extension point (`LoraConfig._register_custom_module`): `FreqMoLELinear` subclasses
peft's LoRA `Linear`; the LF expert is peft's own `lora_A`/`lora_B`, the HF expert and α are extra
adapter layers. Injecting, saving and loading (FreqMoLE or the plain-LoRA baseline on the same targets)
is `labkit.adapters`. Gap choices (the paper does not say): α is one scalar per adapted linear (initialised
to its block's prior; `alpha_by_block` reports block means), both experts share the rank.
"""

from __future__ import annotations

import math
import re

import torch
from peft.tuners.lora.layer import Linear as LoraLinear  # heavy dependency: this module is imported lazily
from torch import nn

ADAPTER = "default"  # peft's adapter name, the only one labkit injects


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


def init_alpha(transformer, prior: dict | None = None) -> None:
    """Set every FreqMoLE linear's α to its block's depth prior (after injection)."""
    depths = block_depths(transformer)
    with torch.no_grad():
        for name, mod in transformer.named_modules():
            if isinstance(mod, FreqMoLELinear):
                blk = re.match(r"^(\w+\.\d+)\.", name).group(1)
                mod.lora_freq_alpha[ADAPTER].fill_(depth_prior(depths[blk], **(prior or {})))


def alpha_by_block(transformer) -> dict[str, float]:
    """Mean α of the FreqMoLE linears of each block."""
    out: dict[str, list[float]] = {}
    for name, mod in transformer.named_modules():
        if isinstance(mod, FreqMoLELinear):
            out.setdefault(re.match(r"^(\w+\.\d+)\.", name).group(1), []).append(
                float(mod.lora_freq_alpha[ADAPTER].detach())
            )
    return {k: sum(v) / len(v) for k, v in out.items()}
