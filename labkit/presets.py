"""Named backbone configs: `tiny` (random init), `mini` (trained by labkit on CPU), `flux-kontext` (real).

Everything that depends on the preset name lives here and in `models.load`; the rest of labkit only
sees a `Backbone` with the same module tree at every scale.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# the committed mini weights; LABKIT_MINI_WEIGHTS points every `mini` load at another folder (a continued run)
MINI_WEIGHTS = Path(os.environ.get("LABKIT_MINI_WEIGHTS") or PACKAGE_DIR / "weights" / "mini")

# The instructions a tiny/mini backbone knows (a learned embedding each; no tokenizer download).
INSTRUCTIONS = (
    "reconstruct",  # copy the context image
    "upscale",  # the context is a bicubic-downscaled version of the target
    "restore",  # a region of the context is degraded; a reference shows the same content elsewhere
    "denoise",  # the context is noisy
    "refine",  # RefGC-SR2: "use the reference in IMG1 to refine IMG2" (LRGI + HRRI -> HRGT)
)
PROMPT_ALIASES = {"use the reference in img1 to refine img2": "refine"}


@dataclass(frozen=True)
class Preset:
    """One backbone scale: model configs, working resolution and where its weights live."""

    name: str
    transformer: dict = field(default_factory=dict)  # FluxTransformer2DModel config
    vae: dict = field(default_factory=dict)  # AutoencoderKL config
    resolution: int = 128  # default working side (pixels) of the target image
    weights: str | None = None  # folder with safetensors weights (mini) / diffusers folder (flux-kontext)
    text: str = "learned"  # "learned" instruction embedding, or "t5clip" (real pipeline)
    n_text_tokens: int = 4  # length of the learned instruction sequence
    dtype: str = "float32"  # compute dtype on CUDA; CPU always runs float32
    hub_id: str | None = None  # what to download on a GPU box (never fetched by labkit)
    # FlowMatchEulerDiscreteScheduler config: tiny/mini sample on plain linspace sigmas (what mini trained
    # on); a pipeline folder brings its own (FLUX: dynamic shift from the token count)
    scheduler: dict = field(default_factory=lambda: dict(shift=1.0, use_dynamic_shifting=False))
    steps: int = 8  # default sampler steps (refine, generate)
    guidance: float | None = None  # default embedded guidance (guidance-distilled models only)
    kontext_resolutions: bool = (
        False  # resize inputs to FLUX.1-Kontext's preferred resolutions (its pipeline's auto-resize)
    )

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 16))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", (1, 1, 1, 1))) - 1)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor × 2×2 packing)."""
        return self.vae_factor * 2


def _vae(blocks: tuple[int, ...], groups: int, layers: int = 1, attn: bool = False) -> dict:
    """AutoencoderKL config with FLUX's latent layout (16 channels, 8x down) at a chosen width."""
    n = len(blocks)
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=blocks,
        layers_per_block=layers,
        norm_num_groups=groups,
        mid_block_add_attention=attn,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,  # replaced by the statistics of the trained latents
        sample_size=128,
        force_upcast=False,
    )


def _dit(double: int, single: int, heads: int, head_dim: int, rope: tuple[int, int, int], text_dim: int) -> dict:
    """FluxTransformer2DModel config; packed 2x2 latents of 16 channels -> 64 input features."""
    assert sum(rope) == head_dim, "axes_dims_rope must sum to attention_head_dim"
    return dict(
        patch_size=1,
        in_channels=64,
        out_channels=None,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=False,
        axes_dims_rope=rope,
    )


# FLUX.1-Kontext-dev's transformer (its transformer/config.json): what the benchmarks build on the meta device
FLUX_KONTEXT_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

PRESETS: dict[str, Preset] = {
    # smallest configs that keep the real module tree (double + single blocks, 8x VAE, 16 channels)
    "tiny": Preset(
        name="tiny",
        transformer=_dit(double=2, single=2, heads=2, head_dim=16, rope=(4, 6, 6), text_dim=32),
        vae=_vae(blocks=(8, 8, 16, 16), groups=4),
        resolution=64,
    ),
    # trained by labkit itself on CPU (`make mini`); weights committed under labkit/weights/mini
    "mini": Preset(
        name="mini",
        transformer=_dit(double=3, single=6, heads=4, head_dim=32, rope=(8, 12, 12), text_dim=64),
        vae=_vae(blocks=(16, 32, 64, 64), groups=8),  # 1.0M params: 0.4 s/step at 48², batch 16, AVX2 CPU
        resolution=128,
        weights=str(MINI_WEIGHTS),
    ),
    # FLUX.1-Kontext-dev from a local diffusers folder or the HF cache (bf16 on CUDA)
    "flux-kontext": Preset(
        name="flux-kontext",
        resolution=1024,
        text="t5clip",
        dtype="bfloat16",
        steps=28,
        guidance=2.5,
        kontext_resolutions=True,
        vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=16),
        hub_id="black-forest-labs/FLUX.1-Kontext-dev",
    ),
}


class UnknownPreset(ValueError, KeyError):
    """A preset name that is neither a known preset nor an existing folder (a usage error)."""

    __str__ = ValueError.__str__


def check_preset(name: str) -> str:
    """A preset argument as the command lines take it: a known name or an existing pipeline folder."""
    if name in PRESETS or Path(name).expanduser().is_dir():
        return name
    raise UnknownPreset(
        f"unknown preset {name!r}: choose one of {sorted(PRESETS)}, or give an existing FluxKontextPipeline folder"
    )


def prompt_checker(preset: str):
    """prompt -> bool: whether a backbone built from this preset understands the prompt (learned instructions on
    tiny/mini, their aliases; any text on a real text encoder)."""
    if check_preset(preset) in PRESETS and PRESETS[preset].text == "learned":
        known = set(INSTRUCTIONS) | set(PROMPT_ALIASES)
        return lambda prompt: str(prompt).strip().lower() in known
    return lambda prompt: isinstance(prompt, str)


def editor_region(preset: str) -> str:
    """The region encoding a preset's editor was trained with (its card's editor recipe), else 'none'."""
    cfg = PRESETS.get(preset)
    card = Path(cfg.weights) / "card.json" if cfg is not None and cfg.weights else None
    if card is None or not card.exists():
        return "none"
    stages = json.loads(card.read_text()).get("stages", {})
    editors = [v for k, v in stages.items() if k.startswith("editor")]  # editor, editor_refine, editor_refine2, ...
    last = editors[-1] if editors else {}  # the latest editor stage (the card keeps them in training order)
    return last.get("recipe", {}).get("region", "none")


def get(name: str | os.PathLike, **overrides) -> Preset:
    """Look up a preset by name, or a diffusers FluxKontextPipeline folder (the save_pretrained layout, as a
    path: the flux-kontext preset with those weights); keyword overrides replace its fields (e.g. resolution=256)."""
    if isinstance(name, os.PathLike) or (name not in PRESETS and (os.sep in name or Path(name).expanduser().exists())):
        overrides["weights"] = str(Path(name).expanduser())
        name = "flux-kontext"
    if name not in PRESETS:
        raise UnknownPreset(
            f"unknown preset {name!r}: choose one of {sorted(PRESETS)}, or give a FluxKontextPipeline folder"
        )
    preset = PRESETS[name]
    if name == "flux-kontext" and "weights" not in overrides:
        overrides["weights"] = os.environ.get("LABKIT_FLUX_KONTEXT")
    return replace(preset, **overrides) if overrides else preset
