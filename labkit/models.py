"""One backbone abstraction at three scales: VAE + Flux(Kontext) transformer + prompt encoder.

`load(preset)` returns a `Backbone` with the same module tree for `tiny`, `mini` and `flux-kontext`:
VAE encode/decode (with scaling/shift), 2x2 pack/unpack, the Kontext sequence (target id 0, context
k id k) and a forward that returns the velocity for the target tokens only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from . import presets as P
from .images import resize
from .util import atomic_save, write_json


class InstructionEmbedding(nn.Module):
    """A learned token sequence + pooled vector per instruction (tiny/mini stand-in for T5 + CLIP)."""

    def __init__(self, n_tokens: int, dim: int, pooled_dim: int, instructions: Sequence[str] = P.INSTRUCTIONS):
        super().__init__()
        self.instructions = tuple(instructions)
        self.tokens = nn.Parameter(torch.randn(len(instructions), n_tokens, dim) * 0.02)  # (I, T, D)
        self.pooled = nn.Parameter(torch.randn(len(instructions), pooled_dim) * 0.02)  # (I, P)

    def index(self, prompt: str) -> int:
        """Position of an instruction name (or a known alias such as RefGC-SR2's prompt)."""
        key = P.PROMPT_ALIASES.get(prompt.strip().lower(), prompt.strip().lower())
        if key not in self.instructions:
            raise ValueError(
                f"unknown instruction {prompt!r} for a learned-embedding backbone; "
                f"use one of {self.instructions} (free text needs the flux-kontext preset)"
            )
        return self.instructions.index(key)

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index(p) for p in prompts], device=self.tokens.device)
        return self.tokens[idx], self.pooled[idx]


class AutocastRMSNorm(nn.RMSNorm):
    """torch's RMSNorm with its weight cast to the input's dtype: under bf16 autocast the fp32 weight otherwise meets
    bf16 activations and rms_norm cannot dispatch to its fused kernel. Identical in fp32; same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


def fuse_rms_norms(module: nn.Module) -> int:
    """Make every torch RMSNorm in `module` (FLUX's q/k norms) an AutocastRMSNorm, in place; returns how many."""
    norms = [m for m in module.modules() if type(m) is nn.RMSNorm]
    for m in norms:
        m.__class__ = AutocastRMSNorm
    return len(norms)


class Backbone(nn.Module):
    """VAE + FluxTransformer2DModel + prompt encoder, with Kontext-style sequence handling."""

    def __init__(
        self, preset: P.Preset, transformer: nn.Module, vae: nn.Module, text: nn.Module | None = None, pipe=None
    ):
        super().__init__()
        self.preset, self.transformer, self.vae, self.text = preset, transformer, vae, text
        if transformer is not None:  # bf16 autocast keeps rms_norm's fused kernel
            fuse_rms_norms(transformer)
        self.pipe = pipe  # the FluxKontextPipeline for flux-kontext (T5 + CLIP live there)
        self.scheduler_config = dict(pipe.scheduler.config) if pipe is not None else dict(preset.scheduler)
        self.factor = preset.vae_factor
        self.multiple = preset.multiple
        self.prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # prompt -> embeddings
        self.text_encoders_freed = False

    def identity(self) -> dict:
        """Which backbone this is: preset name and a short hash of the base transformer (config + a bf16-rounded
        sample of every weight, adapters excluded), recorded with adapters so they load only where they were trained."""
        h = hashlib.sha256(json.dumps(dict(self.transformer.config), sort_keys=True, default=str).encode())
        for name, t in self.transformer.state_dict().items():
            if "lora_" in name:
                continue
            h.update(name.replace(".base_layer", "").encode())
            t = t.dequantize() if type(t) is not torch.Tensor else t  # a quantized base: its dequantized weights
            h.update(t.detach().flatten()[:256].to(torch.bfloat16).float().cpu().numpy().tobytes())
        return dict(preset=self.preset.name, model_hash=h.hexdigest()[:12])

    # -- devices ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the pipeline's execution device (under CPU offload the weights sit elsewhere)."""
        if self.pipe is not None:
            return self.pipe._execution_device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # -- VAE ----------------------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate (B, 3, H, W) images in [0, 1] with sides a multiple of the packing unit."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be (B, 3, H, W) RGB in [0, 1]; got shape {tuple(images.shape)} "
                "(convert grey/RGBA images to RGB first)"
            )
        h, w = images.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(
                f"image sides must be multiples of {self.multiple} (VAE x{self.factor} and 2x2 packing); "
                f"got {h}x{w}: resize with labkit.focus.snap_size or crop"
            )
        return images

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised latents (B, 16, H/8, W/8) = (z - shift) * scale."""
        images = self.check_images(images).to(self.device, self.vae.dtype)
        dist = self.vae.encode(images * 2 - 1).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        cfg = self.vae.config
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [0, 1]."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def roundtrip(self, images: torch.Tensor) -> torch.Tensor:
        """decode(encode(images)): what the VAE alone keeps."""
        return self.decode(self.encode(images))

    # -- tokens ---------------------------------------------------------------------------------
    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C), FLUX's 2x2 packing."""
        return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h/2 * w/2, 4C) -> (B, C, h, w); h, w are latent sides."""
        return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)

    @staticmethod
    def image_ids(h: int, w: int, index: int, device=None) -> torch.Tensor:
        """Position ids (h/2 * w/2, 3) of one packed latent grid: (index, row, col)."""
        ids = torch.zeros(h // 2, w // 2, 3, device=device)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
        return ids.reshape(-1, 3)

    @staticmethod
    def token_spans(grids, names) -> dict:
        """Named spans of the image-token sequence [target | context 1 | ...] for latent grids (h, w) in that order:
        {name: slice}, e.g. token_spans([z.shape[-2:]] * 2, ("target", "draft"))["draft"]."""
        spans, start = {}, 0
        for name, (h, w) in zip(names, grids, strict=True):
            spans[name] = slice(start, start + int(h) * int(w) // 4)
            start = spans[name].stop
        return spans

    def sequence(
        self, target: torch.Tensor, contexts: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Kontext/SELF sequence: [target (id 0) | context 1 (id 1) | ...] -> (tokens, ids, lengths)."""
        grids = [target, *contexts]
        tokens = torch.cat([self.pack(g) for g in grids], dim=1)
        ids = torch.cat([self.image_ids(g.shape[-2], g.shape[-1], k, g.device) for k, g in enumerate(grids)])
        return tokens, ids, [g.shape[-2] * g.shape[-1] // 4 for g in grids]

    # -- text -----------------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | Sequence[str], batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt(s) -> (embeds (B, T, D), pooled (B, P), text ids (T, 3)); one interface at all scales."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if batch and len(prompts) == 1:
            prompts = prompts * batch
        if self.pipe is not None:
            self.cache_prompts(sorted(set(prompts)), free=False)
            rows = [self.prompt_cache[q] for q in prompts]
            embeds, pooled = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            txt_ids = rows[0][2]
        else:
            embeds, pooled = self.text(prompts)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device)
        return embeds.to(self.dtype), pooled.to(self.dtype), txt_ids

    def cache_prompts(self, prompts: Sequence[str], free: bool = True) -> None:
        """Encode these prompts once (T5 + CLIP, through the pipeline) and keep their embeddings; free=True then
        deletes the text encoders (~9.5 GB in bf16 for FLUX.1: the 4.7B T5 and CLIP) - later prompts must be here."""
        if self.pipe is None:
            return
        todo = [q for q in prompts if q not in self.prompt_cache]
        if todo and self.text_encoders_freed:
            raise ValueError(
                f"prompt {todo[0]!r} was not cached before the text encoders were freed: pass every prompt to "
                "labkit.load(..., cache_prompts=[...]) or bb.cache_prompts([...]) first"
            )
        for q in todo:
            e, pooled, ids = self.pipe.encode_prompt(prompt=[q], prompt_2=None, device=self.device)
            self.prompt_cache[q] = (e.detach(), pooled.detach(), ids.detach())
        if free and not self.text_encoders_freed:
            self.pipe.text_encoder = self.pipe.text_encoder_2 = None
            self.text_encoders_freed = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float,
        contexts: Sequence[torch.Tensor] = (),
        prompt: str | Sequence[str] = "reconstruct",
        prompt_embeds: tuple | None = None,
        guidance: float = 2.5,
        joint_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Velocity v = eps - x0 for the target latents x_t (B, 16, h, w) at time t in [0, 1] (1 = noise)."""
        b, _, h, w = x_t.shape
        tokens, img_ids, lengths = self.sequence(x_t, contexts)
        embeds, pooled, txt_ids = prompt_embeds or self.encode_prompt(prompt, batch=b)
        t = (
            torch.as_tensor(t, device=x_t.device, dtype=tokens.dtype).expand(b)
            if not torch.is_tensor(t) or t.ndim == 0
            else t.to(x_t.device, tokens.dtype)
        )
        g = (
            torch.full((b,), guidance, device=x_t.device, dtype=tokens.dtype)
            if self.transformer.config.guidance_embeds
            else None
        )
        out = self.transformer(
            hidden_states=tokens.to(self.dtype),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            joint_attention_kwargs=joint_attention_kwargs,
            return_dict=False,
        )[0]
        return self.unpack(out[:, : lengths[0]].to(x_t.dtype), h, w)  # target tokens only


# ------------------------------------------------------------------------------------------------
def reference_sizes(sizes: Sequence[tuple[int, int]], pixel_budget: int, multiple: int = 16) -> list[tuple[int, int]]:
    """UniRef SELF allocation: one shared scale s = sqrt(B / Σ H·W), sides floored to `multiple`, so the
    total never exceeds the budget; raises if even one multiple per side does not fit."""
    if not sizes:
        return []
    floor = len(sizes) * multiple * multiple
    if pixel_budget < floor:
        raise ValueError(
            f"pixel budget {pixel_budget} is below {floor}, the least {len(sizes)} references of "
            f"{multiple}x{multiple} need: raise the budget or pass fewer references"
        )
    snap = lambda v, s: max(multiple, int(v * s // multiple) * multiple)  # noqa: E731
    s = (pixel_budget / sum(h * w for h, w in sizes)) ** 0.5
    while True:  # clamping tiny sides up to one multiple can overshoot: lower the shared scale (aspects kept)
        out = [(snap(h, s), snap(w, s)) for h, w in sizes]
        if sum(h * w for h, w in out) <= pixel_budget:  # ends: at s -> 0 every side is one multiple (checked above)
            return out
        s *= 0.98


def pack_references(images: Sequence[torch.Tensor], pixel_budget: int, multiple: int = 16) -> list[torch.Tensor]:
    """Resize K reference images (3, H_k, W_k) with one shared scale under a total pixel budget (SELF)."""
    for im in images:
        if im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"each reference must be (3, H, W); got {tuple(im.shape)}")
    sizes = reference_sizes([tuple(im.shape[-2:]) for im in images], pixel_budget, multiple)
    return [resize(im, hw) for im, hw in zip(images, sizes)]


def build(preset: P.Preset) -> Backbone:
    """A random-init backbone from a preset's configs (tiny, or mini before loading weights)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel  # heavy: imported where used

    transformer = FluxTransformer2DModel(**preset.transformer)
    vae = AutoencoderKL(**preset.vae)
    cfg = preset.transformer
    text = InstructionEmbedding(preset.n_text_tokens, cfg["joint_attention_dim"], cfg["pooled_projection_dim"])
    return Backbone(preset, transformer, vae, text)


QUANTIZE = ("none", "int8", "float8", "nf4")  # the frozen transformer's weights (diffusers' quantization configs)
OFFLOAD = ("none", "model", "sequential")  # diffusers' CPU offload of the pipeline's components, for inference
MEMORY = dict(quantize="none", offload="none")  # what load() uses for a pipeline preset when not told (memory_options)


def memory_options(quantize: str | None = None, offload: str | None = None) -> dict:
    """Set the memory options every later load() of a pipeline folder / flux-kontext uses unless told otherwise
    (a notebook's `quantize` / `offload` parameters, `labkit refine --quantize`); labkit's own small backbones
    ignore them. Returns the options now in force."""
    new = MEMORY | {k: v for k, v in dict(quantize=quantize, offload=offload).items() if v is not None}
    check_memory_names(new["quantize"], new["offload"])
    MEMORY.update(new)
    return dict(MEMORY)


def load(
    preset: str | os.PathLike = "mini",
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    quantize: str | None = None,
    offload: str | None = None,
    cache_prompts: Sequence[str] | None = None,
    **overrides,
) -> Backbone:
    """Load a backbone by preset name (tiny | mini | flux-kontext), or from a diffusers FluxKontextPipeline
    folder (the save_pretrained layout) given as a path; overrides replace preset fields (e.g. weights='/path').
    Memory options (a pipeline folder / flux-kontext only): quantize the frozen transformer (QUANTIZE: torchao
    int8 / float8 weight-only, bitsandbytes NF4 on CUDA; adapters stay bf16/fp32), offload (OFFLOAD: diffusers'
    model or sequential CPU offload, for inference on small cards) and cache_prompts (encode these prompts once,
    then free the text encoders); quantize/offload None: memory_options' (MEMORY) for a pipeline, none otherwise."""
    cfg = P.get(preset, **overrides)  # a name, or a pipeline folder (flux-kontext with those weights)
    pipeline = cfg.text == "t5clip"
    quantize = quantize if quantize is not None else MEMORY["quantize"] if pipeline else "none"
    offload = offload if offload is not None else MEMORY["offload"] if pipeline else "none"
    check_memory_options(cfg, device, quantize, offload, cache_prompts)
    if pipeline:
        bb = _load_pipeline(cfg, device, quantize, offload)
        if cache_prompts:
            bb.cache_prompts(list(cache_prompts), free=True)
        return bb
    torch.manual_seed(seed)
    bb = build(cfg)
    if cfg.weights:
        load_weights(bb, cfg.weights)
    return bb.to(device).eval().requires_grad_(False)


def check_memory_names(quantize: str, offload: str) -> None:
    """quantize in QUANTIZE and offload in OFFLOAD, else ValueError listing both."""
    if quantize not in QUANTIZE or offload not in OFFLOAD:
        raise ValueError(
            f"quantize must be one of {QUANTIZE} and offload one of {OFFLOAD}; got {quantize!r}, {offload!r}"
        )


def check_memory_options(cfg: P.Preset, device, quantize: str, offload: str, prompts) -> None:
    """Refuse memory options that cannot apply here, naming the fix (before anything loads)."""
    check_memory_names(quantize, offload)
    if cfg.text != "t5clip" and (quantize != "none" or offload != "none" or prompts):
        raise ValueError(
            f"quantize/offload/cache_prompts apply to a FluxKontextPipeline folder (flux-kontext); {cfg.name!r} is "
            "labkit's own small backbone and fits anywhere: leave them at their defaults"
        )
    cuda = torch.device(device).type == "cuda"
    if quantize == "nf4" and not cuda:
        raise ValueError("quantize='nf4' (bitsandbytes) needs a CUDA device; on CPU use quantize='int8' (torchao)")
    if offload != "none" and not cuda:
        raise ValueError(f"offload={offload!r} moves weights between the CPU and a GPU: it needs device='cuda'")


def quantization_config(quantize: str, dtype: torch.dtype):
    """diffusers' PipelineQuantizationConfig quantizing only the transformer (None for 'none')."""
    if quantize == "none":
        return None
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig, TorchAoConfig  # heavy: imported where used

    if quantize == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig  # optional: where used

        q = TorchAoConfig(Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig())
    return PipelineQuantizationConfig(quant_mapping={"transformer": q})


WEIGHT_FILES = ("vae", "transformer", "text")


def save_weights(bb: Backbone, folder: str | os.PathLike, card: dict | None = None) -> Path:
    """Write vae/transformer/text .safetensors (atomically) and the VAE latent statistics to a folder."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        sd = {k: v.detach().cpu().contiguous() for k, v in getattr(bb, name).state_dict().items()}
        atomic_save(lambda p, sd=sd: save_file(sd, p), folder / f"{name}.safetensors")
    stats = dict(
        scaling_factor=float(bb.vae.config.scaling_factor), shift_factor=float(bb.vae.config.shift_factor or 0.0)
    )
    write_json(stats, folder / "latent_stats.json")
    if card is not None:
        write_json(card, folder / "card.json")
    return folder


def load_weights(bb: Backbone, folder: str | os.PathLike, parts: Sequence[str] = WEIGHT_FILES) -> Backbone:
    """Load safetensors weights into a built backbone; a missing folder says how to make it."""
    folder = Path(folder)
    missing = [n for n in parts if not (folder / f"{n}.safetensors").exists()]
    if missing:
        hint = (
            "run `make mini` (python -m labkit.train mini) to train them on CPU, or use preset='tiny'"
            if bb.preset.name == "mini"
            else "save them with labkit.models.save_weights"
        )
        raise FileNotFoundError(f"{bb.preset.name} weights not found in {folder} (missing {missing}): {hint}")
    for name in parts:
        getattr(bb, name).load_state_dict(load_file(folder / f"{name}.safetensors"), strict=True)
    stats = folder / "latent_stats.json"
    if stats.exists():
        bb.vae.register_to_config(**json.loads(stats.read_text()))
    return bb


def resolve_flux_path(cfg: P.Preset) -> Path:
    """The local diffusers folder of FLUX.1-Kontext-dev: explicit path, $LABKIT_FLUX_KONTEXT, or HF cache."""
    how = (
        f"download it on a machine with access (accept the licence of {cfg.hub_id} first): "
        f"`hf download {cfg.hub_id} --local-dir /path/to/FLUX.1-Kontext-dev`, then "
        "labkit.load('flux-kontext', weights='/path/to/FLUX.1-Kontext-dev') or export LABKIT_FLUX_KONTEXT=that path"
    )
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"no diffusers folder (model_index.json) at {path}; {how}")
        check_pipeline_folder(path)
        return path
    try:
        from huggingface_hub import snapshot_download  # optional: imported where used

        return Path(snapshot_download(cfg.hub_id, local_files_only=True))  # cache only: never a network call
    except Exception as e:
        raise FileNotFoundError(
            f"FLUX.1-Kontext-dev is not in the local HF cache ({type(e).__name__}); {how}"
        ) from None


PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def check_pipeline_folder(path: Path) -> dict:
    """Validate a FluxKontextPipeline folder before diffusers reads it; errors name the file and the problem."""
    index = path / "model_index.json"
    fix = "re-save it with pipe.save_pretrained(folder) or download it again"
    try:
        spec = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not valid JSON ({e.msg} at line {e.lineno}): {fix}") from None
    if not isinstance(spec, dict) or "_class_name" not in spec:
        raise ValueError(
            f"{index} has no '_class_name' (expected 'FluxKontextPipeline'): not a diffusers pipeline folder; {fix}"
        )
    missing = [p for p in PIPELINE_PARTS if not isinstance(spec.get(p), list) or spec[p][0] is None]
    if missing:
        raise ValueError(f"{index} lists no {missing} (a FluxKontextPipeline needs {list(PIPELINE_PARTS)}); {fix}")
    for part in PIPELINE_PARTS:
        sub = path / part
        need = sub / ("scheduler_config.json" if part == "scheduler" else "config.json")
        if part.startswith("tokenizer"):
            if not sub.is_dir() or not any(sub.iterdir()):
                raise FileNotFoundError(f"{sub} is missing or empty (model_index.json lists a {part}); {fix}")
        elif not need.exists():
            raise FileNotFoundError(f"{need} is missing (model_index.json lists a {part}); {fix}")
        elif part in ("transformer", "vae", "text_encoder", "text_encoder_2") and not any(sub.glob("*.safetensors")):
            raise FileNotFoundError(
                f"no *.safetensors weights in {sub}: labkit loads weights only from safetensors; {fix}"
            )
    return spec


def _load_pipeline(cfg: P.Preset, device, quantize: str = "none", offload: str = "none") -> Backbone:
    """FLUX.1-Kontext components through FluxKontextPipeline (bf16 on CUDA, fp32 on CPU), with the transformer
    quantized and the pipeline offloaded as asked."""
    from diffusers import FluxKontextPipeline

    path = resolve_flux_path(cfg)
    dtype = getattr(torch, cfg.dtype) if torch.device(device).type == "cuda" else torch.float32
    q = quantization_config(quantize, dtype)
    pipe = FluxKontextPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, quantization_config=q)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    bb = Backbone(cfg, pipe.transformer, pipe.vae, None, pipe=pipe)
    bb.requires_grad_(False)
    return bb.eval()
