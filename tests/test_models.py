import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit
from labkit import models as M
from labkit import presets as P


def test_pack_unpack_roundtrip():
    z = torch.randn(2, 16, 8, 12)
    tok = M.Backbone.pack(z)
    assert tok.shape == (2, 4 * 6, 64)
    assert torch.equal(M.Backbone.unpack(tok, 8, 12), z)
    # packing order matches diffusers' FluxKontextPipeline._pack_latents
    from diffusers import FluxKontextPipeline

    assert torch.equal(tok, FluxKontextPipeline._pack_latents(z, 2, 16, 8, 12))


def test_sequence_ids_and_lengths():
    t, c1, c2 = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 8), torch.randn(1, 16, 8, 8)
    tokens, ids, lengths = M.Backbone(P.get("tiny"), None, None).sequence(t, [c1, c2])
    assert lengths == [16, 8, 16] and tokens.shape == (1, 40, 64) and ids.shape == (40, 3)
    assert ids[:16, 0].eq(0).all() and ids[16:24, 0].eq(1).all() and ids[24:, 0].eq(2).all()
    assert ids[16:24, 1].max() == 1 and ids[16:24, 2].max() == 3  # each context keeps its own 2-D grid


def test_forward_returns_target_only_and_depends_on_context(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    c = torch.randn(2, 16, 8, 8, generator=g)
    v1 = tiny(x, 0.5, [c], prompt="reconstruct")
    v2 = tiny(x, 0.5, [c + 1], prompt="reconstruct")
    v3 = tiny(x, 0.5, [c], prompt="upscale")
    assert v1.shape == x.shape
    assert not torch.allclose(v1, v2) and not torch.allclose(v1, v3)
    assert torch.equal(v1, tiny(x, 0.5, [c], prompt="reconstruct"))  # deterministic


def test_vae_roundtrip_shapes_and_normalisation(tiny):
    x = torch.rand(2, 3, 64, 48)
    z = tiny.encode(x)
    assert z.shape == (2, 16, 8, 6)
    y = tiny.decode(z)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.rand(1, 4, 64, 64), "RGB"),
        (torch.rand(1, 3, 60, 64), "multiples of 16"),
        (torch.rand(1, 3, 8, 8), "multiples of 16"),
    ],
)
def test_bad_images_say_what_to_do(tiny, bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny.encode(bad)


def test_unknown_instruction_lists_known(tiny):
    with pytest.raises(ValueError, match="reconstruct"):
        tiny.encode_prompt("make it pretty")
    assert tiny.encode_prompt("use the reference in IMG1 to refine IMG2")[0].shape[0] == 1


def test_missing_mini_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make mini"):
        labkit.load("mini", weights=str(tmp_path / "nowhere"))


def test_missing_flux_folder_names_path_and_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hf download black-forest-labs/FLUX.1-Kontext-dev"):
        labkit.load("flux-kontext", weights=str(tmp_path / "FLUX"))


def test_safetensors_roundtrip(tiny, tmp_path):
    M.save_weights(tiny, tmp_path)
    bb = labkit.load("tiny", weights=str(tmp_path), seed=123)  # other seed: weights must come from disk
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(bb(x, 0.3, [x]), tiny(x, 0.3, [x]))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "text.safetensors",
        "transformer.safetensors",
        "vae.safetensors",
    ]


def test_import_is_lazy():
    """`import labkit` stays fast (< 3 s, measured in bench/startup.py) by not importing diffusers/peft/transformers."""
    heavy = "('diffusers', 'peft', 'transformers', 'matplotlib')"
    code = f"import sys, labkit; print(sorted(m for m in {heavy} if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(16, 2048), st.integers(16, 2048)), min_size=1, max_size=5),
    st.integers(256 * 256, 2048 * 2048),
)
def test_self_budget_never_exceeded(sizes, budget):
    out = M.reference_sizes(sizes, budget, 16)
    assert sum(h * w for h, w in out) <= budget
    assert all(h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16 for h, w in out)
    # one shared scale: aspect kept within the snapping error (when no side was clamped to the minimum)
    for (h, w), (h2, w2) in zip(sizes, out):
        if h2 > 16 and w2 > 16 and sum(a * b for a, b in out) > budget * 0.5:
            assert abs(h2 / w2 - h / w) <= (h / w) * (16 / min(h2, w2)) * 2 + 1e-9


def test_pack_references_budget_and_errors():
    refs = [torch.rand(3, 200, 300), torch.rand(3, 512, 512)]
    out = M.pack_references(refs, 256 * 256)
    assert sum(r.shape[-1] * r.shape[-2] for r in out) <= 256 * 256
    with pytest.raises(ValueError, match="raise the budget"):
        M.pack_references(refs, 100)


def test_committed_mini_card_matches_weights():
    import json

    from labkit.mini import weights_hash

    folder = P.MINI_WEIGHTS
    if not (folder / "card.json").exists():
        pytest.skip("mini weights not committed yet (make mini)")
    card = json.loads((folder / "card.json").read_text())
    assert card["sha256"] == weights_hash(folder)
    stages = list(card["stages"])
    assert stages[:2] == ["vae", "editor"] and all(k.startswith("editor_refine") for k in stages[2:])
    for k in stages[2:]:  # a continued editor records its init, warm restart and budget
        st = card["stages"][k]
        assert st["warm_restart"] and st["steps"] > 0 and st["evals"] and st["init"]
    assert "region_comparison" in card["stages"].get("editor_refine", {"region_comparison": None})


def test_mini_loads_deterministically():
    if not (P.MINI_WEIGHTS / "transformer.safetensors").exists():
        pytest.skip("mini weights not committed yet (make mini)")
    a, b = labkit.load("mini", seed=0), labkit.load("mini", seed=1)
    x = torch.rand(1, 3, 128, 128)
    za, zb = a.encode(x), b.encode(x)
    assert torch.equal(za, zb)
    assert torch.equal(a(za, 0.5, [za], prompt="restore"), b(zb, 0.5, [zb], prompt="restore"))


def test_rms_norms_take_the_fused_path_under_bf16_autocast(tiny):
    """FLUX's q/k RMSNorms cast their fp32 weight to the activations' dtype: identical in fp32, and under bf16
    autocast torch no longer warns that rms_norm cannot dispatch to its fused kernel."""
    import warnings

    from labkit.models import AutocastRMSNorm

    norms = [m for m in tiny.transformer.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert norms and all(type(m) is AutocastRMSNorm for m in norms)
    x = torch.randn(2, 5, norms[0].normalized_shape[0])
    plain = torch.nn.functional.rms_norm(x, norms[0].normalized_shape, norms[0].weight, norms[0].eps)
    assert torch.equal(norms[0](x), plain)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(1, 16, 8, 8, generator=g) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        tiny(z[0], torch.full((1,), 0.5), z[1:], prompt="restore")
    assert not [w for w in caught if "fused implementation" in str(w.message)]
