"""Memory options for the real model, on a tiny FluxKontextPipeline folder on CPU: a quantized frozen transformer
(torchao int8 weight-only through diffusers' quantization config) stays close to the unquantized one, shrinks as
the format says, and LoRA / FreqMoLE adapters train on it; prompt embeddings computed once let the text encoders
go; options that cannot apply are refused with the fix."""

import pytest
import torch
from test_flux_loader import _tiny_pipeline

import labkit
from labkit import adapters as AD

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _tiny_pipeline(tmp_path_factory.mktemp("pipe"), flux_like=True)[1]


def _linear_bytes(t: torch.nn.Module) -> int:
    """Bytes of the transformer blocks' linear weights (what weight-only quantization converts)."""
    total = 0
    for m in t.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dim() == 2:
            w = m.weight
            inner = [getattr(w, a) for a in ("qdata", "int_data", "tensor_impl") if hasattr(w, a)]
            data = inner[0] if inner and torch.is_tensor(inner[0]) else w
            total += data.numel() * data.element_size()
    return total


def _velocity(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        return bb(x, torch.full((1,), 0.5), [ctx], prompt="a red cat", guidance=2.5)


def test_int8_weight_only_base_is_close_and_four_times_smaller(folder):
    full, q = labkit.load(str(folder)), labkit.load(str(folder), quantize="int8")
    a, b = _velocity(full), _velocity(q)
    rel = (a - b).norm() / a.norm()
    assert rel < 0.05, f"int8 weight-only output differs by {rel:.3f} (relative L2)"
    assert _linear_bytes(q.transformer) < 0.3 * _linear_bytes(full.transformer)  # int8 vs fp32 weights (+ scales)
    # the identity adapters record (train_sft) is computed on the quantized base too, and is the same on a reload
    assert q.identity() == labkit.load(str(folder), quantize="int8").identity() != full.identity()


@pytest.mark.parametrize("kind", ["lora", "freqmole"])
def test_adapters_train_on_a_quantized_base(folder, kind):
    bb = labkit.load(str(folder), quantize="int8")
    base = {n: p.detach().clone() for n, p in bb.transformer.named_parameters()}
    AD.inject(bb.transformer, kind, rank=2)
    params = [p for p in bb.transformer.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # the adapters stay full precision
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, ctx, target = (torch.randn(1, 16, 8, 8, generator=g) for _ in range(3))
    emb = bb.encode_prompt("a red cat")
    losses = []
    for _ in range(8):
        v = bb(x, torch.full((1,), 0.5), [ctx], prompt_embeds=emb, guidance=2.5)
        loss = (v - target).pow(2).mean()
        loss.backward(), opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    dense = lambda w: w.dequantize() if hasattr(w, "dequantize") else w  # noqa: E731
    for n, p in bb.transformer.named_parameters():  # the quantized base did not move
        if n in base and not p.requires_grad:
            assert torch.equal(dense(p.detach()), dense(base[n])), n


def test_prompts_cached_then_text_encoders_freed(folder):
    plain = labkit.load(str(folder))
    bb = labkit.load(str(folder), cache_prompts=["a red cat"])
    assert bb.pipe.text_encoder is None and bb.pipe.text_encoder_2 is None
    for a, b in zip(plain.encode_prompt("a red cat", batch=2), bb.encode_prompt("a red cat", batch=2)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not cached before the text encoders were freed"):
        bb.encode_prompt("a blue dog")


def test_memory_options_that_cannot_apply_are_refused(folder):
    with pytest.raises(ValueError, match="needs device='cuda'"):
        labkit.load(str(folder), offload="model")
    with pytest.raises(ValueError, match="quantize='int8'"):
        labkit.load(str(folder), quantize="nf4")
    with pytest.raises(ValueError, match="labkit's own small backbone"):
        labkit.load("tiny", quantize="int8")
    with pytest.raises(ValueError, match="quantize must be one of"):
        labkit.load(str(folder), quantize="int4")


def test_model_offload_gives_the_same_edit_and_sequential_offload_installs_its_hooks(folder):
    """diffusers' offload through labkit's Backbone. labkit.load refuses offload without CUDA (nothing to offload
    to), so the hooks are installed here with the CPU as the execution device, through the loader itself: model
    offload runs and edits as the plain pipeline does; sequential offload moves every weight to the meta device
    behind accelerate's hooks (its forward needs a GPU to stream the weights to, checked by `make gpu-check`)."""
    from labkit import models as M
    from labkit.editor import Refiner, edit
    from labkit.presets import get

    cfg, g = get(str(folder)), torch.Generator().manual_seed(0)
    img, ref = torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)
    plain = edit(Refiner(M._load_pipeline(cfg, "cpu"), "refine"), img, [ref], 2, 0)
    bb = M._load_pipeline(cfg, "cpu", offload="model")
    assert type(bb.transformer._hf_hook).__name__ == "CpuOffload" and bb.device.type == "cpu"
    out = edit(Refiner(bb, "refine"), img, [ref], 2, 0)
    assert (out - plain).abs().max() < 1e-4
    seq = M._load_pipeline(cfg, "cpu", offload="sequential")
    assert any(p.device.type == "meta" for p in seq.transformer.parameters()) and seq.device.type == "cpu"


def test_memory_options_reach_every_later_load_of_a_pipeline_and_the_refine_command(folder, tmp_path):
    """A notebook's `quantize` parameter (labkit.memory_options) reaches every later labkit.load of the pipeline,
    editor caches included; labkit's own backbones ignore it; `labkit refine --quantize` refuses what cannot apply."""
    from labkit.cli import refine_main
    from labkit.editor import load_refiner

    try:
        assert labkit.memory_options(quantize="int8") == dict(quantize="int8", offload="none")
        bb = labkit.load(str(folder))
        assert _linear_bytes(bb.transformer) < 0.3 * _linear_bytes(
            labkit.load(str(folder), quantize="none").transformer
        )
        quantized = load_refiner(str(folder))  # refine's cached editor follows the options too
        assert _linear_bytes(quantized.bb.transformer) == _linear_bytes(bb.transformer)
        assert labkit.load("tiny").transformer.dtype == torch.float32  # ignored by labkit's own backbones
        with pytest.raises(ValueError, match="quantize must be one of"):
            labkit.memory_options(quantize="int4")
    finally:
        labkit.memory_options(quantize="none", offload="none")
    assert load_refiner(str(folder)) is not quantized  # new options, a new cache entry
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(img)
    assert (
        refine_main([str(img), str(img), "-o", str(tmp_path / "o.png"), "--preset", "tiny", "--quantize", "int8"]) == 2
    )
    assert not (tmp_path / "o.png").exists()
