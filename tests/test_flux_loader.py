"""The flux-kontext path, proven offline: a tiny FluxKontextPipeline saved with save_pretrained loads
back through labkit.load('flux-kontext', weights=folder) and runs the same forward."""

import json

import pytest
import torch

import labkit

FLUX_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)  # FLUX.1-Kontext-dev's scheduler_config.json


def _tiny_pipeline(tmp_path, flux_like: bool = False):
    """A tiny FluxKontextPipeline saved with save_pretrained; flux_like: guidance-distilled transformer and
    FLUX's dynamic-shift scheduler, as the real model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    bb = labkit.load("tiny")
    if flux_like:
        torch.manual_seed(0)
        bb.transformer = FluxTransformer2DModel(**{**dict(bb.transformer.config), "guidance_embeds": True})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"), model_max_length=77)
    d = bb.transformer.config.joint_attention_dim
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=bb.transformer.config.pooled_projection_dim,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d, d_ff=37, d_kv=8, num_layers=1, num_heads=2))
    sched = FlowMatchEulerDiscreteScheduler(**(FLUX_SCHEDULER if flux_like else {}))
    pipe = FluxKontextPipeline(
        scheduler=sched,
        vae=bb.vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok,
        transformer=bb.transformer,
    )
    pipe.vae.register_to_config(shift_factor=0.1, scaling_factor=0.5)
    pipe.save_pretrained(tmp_path / "FLUX.1-Kontext-tiny")
    return bb, tmp_path / "FLUX.1-Kontext-tiny"


def test_flux_kontext_loader_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb, folder = _tiny_pipeline(tmp_path)
    real = labkit.load("flux-kontext", weights=str(folder))
    assert real.pipe is not None and real.text is None
    assert real.vae.config.scaling_factor == 0.5 and real.vae.config.shift_factor == 0.1
    # same transformer weights, same module tree
    assert [n for n, _ in real.transformer.named_modules()] == [n for n, _ in bb.transformer.named_modules()]
    x = torch.randn(1, 16, 8, 8)
    emb = real.encode_prompt("make the logo sharp")
    assert emb[0].shape[-1] == bb.transformer.config.joint_attention_dim and emb[1].shape == (
        1,
        bb.transformer.config.pooled_projection_dim,
    )
    v = real(x, 0.5, [x], prompt_embeds=emb)
    assert v.shape == x.shape
    assert torch.allclose(v, bb(x, 0.5, [x], prompt_embeds=emb), atol=1e-5)
    img = torch.rand(1, 3, 64, 64)
    assert real.encode(img).shape == (1, 16, 8, 8)


def test_flux_kontext_env_var_and_bad_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_FLUX_KONTEXT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        labkit.load("flux-kontext")


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_generate_matches_the_pipeline_it_wraps(tmp_path, monkeypatch, negative):
    """labkit.generate on a pipeline folder = FluxKontextPipeline's own image for the same arguments and initial
    packed latents: scheduler with dynamic shift, embedded guidance, free-text prompt, optional true CFG."""
    import numpy as np
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from labkit.models import Backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, folder = _tiny_pipeline(tmp_path, flux_like=True)
    pipe = FluxKontextPipeline.from_pretrained(folder, local_files_only=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8))
    packed = Backbone.pack(torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3)))
    kw = dict(negative_prompt=negative, true_cfg_scale=2.0) if negative else {}
    ref = pipe(
        image=image,
        prompt="a red cat",
        height=64,
        width=96,
        num_inference_steps=4,
        guidance_scale=3.0,
        latents=packed,
        max_area=64 * 96,
        _auto_resize=False,
        output_type="np",
        **kw,
    ).images[0]
    ours = labkit.generate(
        image,
        "a red cat",
        preset=str(folder),
        steps=4,
        guidance=3.0,
        latents=packed,
        height=64,
        width=96,
        negative_prompt=negative,
        true_cfg=2.0 if negative else 1.0,
        auto_resize=False,
    )
    ref_u8 = (ref * 255).round().astype(np.int16)
    got = np.asarray(ours, np.int16)
    assert got.shape == ref_u8.shape == (64, 96, 3)
    assert np.abs(got - ref_u8).max() <= 1 and np.abs(got - ref_u8).mean() < 0.05  # uint8 rounding only
    # and the same seed draws the same noise as the pipeline's generator does
    ref_seed = pipe(
        image=image,
        prompt="a red cat",
        height=64,
        width=96,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
        max_area=64 * 96,
        _auto_resize=False,
        output_type="np",
        **kw,
    ).images[0]
    ours_seed = labkit.generate(
        image,
        "a red cat",
        preset=str(folder),
        steps=4,
        guidance=3.0,
        seed=5,
        height=64,
        width=96,
        negative_prompt=negative,
        true_cfg=2.0 if negative else 1.0,
        auto_resize=False,
    )
    assert np.abs(np.asarray(ours_seed, np.int16) - (ref_seed * 255).round().astype(np.int16)).max() <= 1


def test_flux_kontext_defaults_and_preferred_resolutions():
    from labkit.inference import kontext_size
    from labkit.presets import get

    fk, mini = get("flux-kontext"), get("mini")
    assert (fk.steps, fk.guidance, fk.resolution) == (28, 2.5, 1024)
    assert kontext_size(768, 1024, fk) == (880, 1184) and kontext_size(1000, 1000, fk) == (
        1024,
        1024,
    )  # the pipeline's table
    assert kontext_size(100, 130, mini) == (96, 128) and mini.steps == 8
