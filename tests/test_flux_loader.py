"""The flux-kontext path, proven offline: a tiny FluxKontextPipeline saved with save_pretrained loads
back through labkit.load('flux-kontext', weights=folder) and runs the same forward."""
import json

import pytest
import torch

import labkit


def _tiny_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    bb = labkit.load("tiny")
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
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=bb.transformer.config.pooled_projection_dim,
                                        intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d, d_ff=37, d_kv=8, num_layers=1, num_heads=2))
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=bb.vae, text_encoder=clip, tokenizer=tok,
                               text_encoder_2=t5, tokenizer_2=tok, transformer=bb.transformer)
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
    assert emb[0].shape[-1] == bb.transformer.config.joint_attention_dim and emb[1].shape == (1, bb.transformer.config.pooled_projection_dim)
    v = real(x, 0.5, [x], prompt_embeds=emb)
    assert v.shape == x.shape
    assert torch.allclose(v, bb(x, 0.5, [x], prompt_embeds=emb), atol=1e-5)
    img = torch.rand(1, 3, 64, 64)
    assert real.encode(img).shape == (1, 16, 8, 8)


def test_flux_kontext_env_var_and_bad_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_FLUX_KONTEXT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        labkit.load("flux-kontext")
