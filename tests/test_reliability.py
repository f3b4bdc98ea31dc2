"""Fail loudly, lose nothing: input checks at the public entry points, adapters that know their backbone,
malformed pipeline folders, isolated sweep points, folders written at once."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import labkit
from labkit import adapters as AD
from labkit import data as D
from labkit import inference as I
from labkit.util import atomic_dir


@pytest.fixture(scope="module")
def case():
    return D.make_triplet(0, "test", 64, 2)


def _refine(case, **kw):
    args = dict(image=case.draft, mask=case.mask, reference=case.reference, preset="tiny", steps=2, method="focus")
    args.update(kw)
    return I.refine_tensor(**args)


@pytest.mark.parametrize("steps", [0, -1, 2.5, "4", True])
def test_steps_must_be_a_positive_integer(case, steps):
    with pytest.raises(ValueError, match=r"steps \(--steps\) must be an integer in 1\.\.1000.*got"):
        _refine(case, steps=steps)


def test_non_finite_and_out_of_range_images_are_refused_with_the_fix(case):
    nan = case.draft.clone()
    nan[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf values"):
        _refine(case, image=nan)
    with pytest.raises(
        ValueError, match=r"image is float with values in \[52, 180\]; expected \[0, 1\]: divide by 255"
    ):
        _refine(case, image=(case.draft * 255).round())
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        _refine(case, image=case.draft * 2 - 1)
    with pytest.raises(ValueError, match="reference is float"):
        _refine(case, reference=case.reference * 255)


def test_uint8_arrays_are_read_as_0_255_by_dtype(case):
    u8 = (case.draft.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    a, _ = _refine(case, image=u8, seed=3)
    b, _ = _refine(case, image=torch.from_numpy(u8).permute(2, 0, 1).float() / 255, seed=3)
    assert torch.equal(a, b)


def test_seed_none_draws_a_fresh_seed_and_reports_it(case):
    out1, i1 = _refine(case, seed=None)
    out2, i2 = _refine(case, seed=None)
    assert isinstance(i1["seed"], int) and i1["seed"] != i2["seed"]
    again, _ = _refine(case, seed=i1["seed"])
    assert torch.equal(again, out1)  # the reported seed reproduces the output bit for bit
    pil = labkit.refine(case.draft, case.mask, case.reference, preset="tiny", steps=2, seed=None)
    assert isinstance(pil.info["labkit_seed"], int)
    with pytest.raises(ValueError, match=r"seed \(--seed\) must be an integer"):
        _refine(case, seed="abc")


@pytest.mark.parametrize("hw", [(1, 1), (1, 64), (64, 1), (7, 13)])
@pytest.mark.parametrize("method", ["focus", "full"])
def test_too_small_images_name_the_minimum(hw, method):
    img = torch.rand(3, *hw)
    mask = torch.ones(*hw)
    with pytest.raises(ValueError, match=rf"is {hw[0]}x{hw[1]} pixels; the model methods need at least 16x16"):
        I.refine_tensor(img, mask, None, method=method, preset="tiny", steps=1)
    out, _ = I.refine_tensor(img, mask, None, method="input", preset="tiny")  # no model: any size
    assert torch.equal(out, img)


def test_binary_masks_in_every_accepted_form(case):
    m = case.mask[0].numpy() > 0.5
    forms = [
        Image.fromarray(m.astype(np.uint8)),
        Image.fromarray(m.astype(np.uint8) * 255),
        m,
        m.astype(np.uint8),
        torch.from_numpy(m).float()[None],
        Image.fromarray(m).convert("1"),
    ]
    for f in forms:
        assert torch.equal(I.as_mask_tensor(f, (64, 64)), torch.from_numpy(m).float()[None]), type(f)
    with pytest.raises(ValueError, match="empty mask"):
        I.as_mask_tensor(np.zeros((64, 64), np.uint8), (64, 64))
    with pytest.raises(ValueError, match="does not match the image"):
        I.as_mask_tensor(m[:32], (64, 64))
    with pytest.raises(ValueError, match=r"float mask values must be finite and in \[0, 1\]"):
        I.as_mask_tensor(m.astype(np.float32) * 255, (64, 64))


def test_adapter_on_another_backbone_says_so_in_one_line(tmp_path):
    from labkit.loop import LoopConfig
    from labkit.sft import SFTConfig, train_sft

    bb = labkit.load("tiny")
    train_sft(
        bb,
        LoopConfig(steps=1, warmup=1, out_dir=str(tmp_path), progress=False, mixed_precision="no"),
        SFTConfig(rank=2, size=64, batch=2, bank=2, val_images=0),
    )
    spec = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert spec["preset"] == "tiny" and spec["model_hash"] == labkit.load("tiny").identity()["model_hash"]
    with pytest.raises(ValueError) as e:
        I.load_refiner("mini", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "trained on preset 'tiny'" in msg and "is 'mini'" in msg
    other = labkit.load("tiny", seed=1)  # the same preset with other weights is another model
    with pytest.raises(ValueError, match="model"):
        AD.load(other.transformer, tmp_path, identity=other.identity())
    assert I.load_refiner("tiny", str(tmp_path)).provenance["kind"] == "freqmole"  # on its own backbone it loads


@pytest.mark.parametrize(
    "index, what",
    [("{}", "_class_name"), ("{not json", "not valid JSON"), ('{"_class_name": "FluxKontextPipeline"}', "lists no")],
)
def test_malformed_pipeline_folder_names_the_file(tmp_path, index, what):
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(ValueError, match=what) as e:
        labkit.load(str(tmp_path))
    assert "model_index.json" in str(e.value)


def test_pipeline_folder_with_a_missing_component_names_it(tmp_path):
    parts = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxKontextPipeline", **{p: ["diffusers", "X"] for p in parts}})
    )
    with pytest.raises(FileNotFoundError, match=r"transformer/config.json is missing"):
        labkit.load(tmp_path)


def test_atomic_dir_keeps_the_old_folder_on_failure_and_swaps_on_success(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as t:
        (t / "a.json").write_text("old")
        (t / "b.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as t:
            (t / "a.json").write_text("new")
            raise RuntimeError("killed between the two files")
    assert (target / "a.json").read_text() == "old" and (target / "b.bin").read_text() == "old"
    with atomic_dir(target) as t:
        (t / "a.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (target / "a.json").read_text() == "new"
    assert not (target / "b.bin").exists()  # the new folder, not a mix
    (tmp_path / ".adapter.x1y2.tmp").mkdir()  # what a writer killed by a signal leaves (no finally ran)
    with atomic_dir(target) as t:
        (t / "a.json").write_text("newer")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the next writer clears it


@pytest.mark.slow
def test_a_failing_sweep_point_is_a_row_and_the_rest_finish(tmp_path):
    import pandas as pd

    from labkit import sweep

    extra = dict(n_images=2, fracs=[0.05, 0.4], upsamples=["work"])
    csv = sweep.grid(
        "03_vae_crop_vs_full", {"device": ["cpu", "cuda"]}, preset="tiny", out=tmp_path, extra=extra, timeout=300
    )
    t = pd.read_csv(csv)
    assert list(t.status) == ["ok", "failed"] and isinstance(t.error[1], str) and t.error[1]
    assert t.crop_beats_full_small_regions.notna()[0] and (tmp_path / "device-cpu" / "results.json").exists()
    assert (tmp_path / "device-cuda.log").exists() and not (tmp_path / "device-cuda").exists()  # nothing half-written
    stamp = (tmp_path / "device-cpu" / "results.json").stat().st_mtime
    code = sweep.main(
        ["grid", "03_vae_crop_vs_full", "--preset", "tiny", "--param", "device=cpu,cuda", "--out", str(tmp_path)]
    )
    assert (
        code == 1 and (tmp_path / "device-cpu" / "results.json").stat().st_mtime == stamp
    )  # failed run: 1; done point skipped
    slow = pd.read_csv(sweep.grid("03_vae_crop_vs_full", {"seed": [5]}, preset="tiny", out=tmp_path / "t", timeout=1))
    assert list(slow.status) == ["timeout"] and "timed out after 1 s" in slow.error[0]
