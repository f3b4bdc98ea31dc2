"""Bad input, round two: the ordinary mistakes a new user makes at the command lines (tiny preset, 64x64
images) get a usage error (exit 2) naming the fix, before anything is written or replaced."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from labkit import cases as CS
from labkit import data as D
from labkit import images as IM
from labkit.cli import refine_main
from labkit.evaluate import main as evaluate_main
from labkit.train import main as train_main


@pytest.fixture()
def folder(tmp_path):
    trips = [D.make_triplet(i, "test", 64, 2) for i in range(3)]
    return CS.write_cases(tmp_path / "cases", trips, splits=["test"] * 3)


def _rows(folder):
    return [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]


def _write(folder, rows):
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_evaluate_refuses_an_out_that_is_a_file_and_leaves_it_alone(folder, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert evaluate_main(["--data", str(folder), "--out", str(notes), "--preset", "tiny", "--steps", "1"]) == 2
    assert notes.is_file() and notes.read_text() == "my notes"
    assert not list(tmp_path.glob(".notes.txt*"))  # no hidden .old copy, nothing renamed


def test_evaluate_refuses_a_folder_holding_other_settings(folder, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "run.json").write_text(
        json.dumps(
            dict(data=str(folder.resolve()), split=None, preset="tiny", methods=["full"], adapters=[], steps=1, seed=0)
        )
    )
    assert (
        evaluate_main(
            [
                "--data",
                str(folder),
                "--out",
                str(out),
                "--preset",
                "tiny",
                "--steps",
                "1",
                "--seed",
                "3",
                "--methods",
                "full",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "seed: 0 -> 3" in err and "--fresh" in err
    (out / "other.txt").write_text("x")
    (out / "run.json").unlink()
    assert (
        evaluate_main(["--data", str(folder), "--out", str(out), "--preset", "tiny", "--steps", "1"]) == 2
    )  # not a labkit folder
    assert (out / "other.txt").exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda a: Image.fromarray(a.astype(np.uint16)),  # PIL mode I;16
        lambda a: Image.fromarray(a.astype(np.int32)),  # mode I: how PIL opens many 16-bit PNGs
    ],
)
def test_sixteen_bit_images_are_read_by_their_range(make, tmp_path):
    grey = np.full((32, 32), 30000)  # 30000 / 65535 = 0.458
    img = make(grey)
    t = IM.as_image_tensor(img)
    assert (
        t.shape == (3, 32, 32) and abs(float(t.mean()) - 30000 / 65535) < 1e-4
    )  # was 1.0: PIL's convert('RGB') clips to white
    Image.fromarray(grey.astype(np.uint16)).save(tmp_path / "g16.png")  # a 16-bit PNG on disk
    t2 = IM.as_image_tensor(IM.read_image(tmp_path / "g16.png"))
    assert abs(float(t2.mean()) - 30000 / 65535) < 1e-3
    rgb16 = np.full((8, 8, 3), 65535, np.uint16)
    rgb16[..., 0] = 0
    t3 = IM.as_image_tensor(rgb16)
    assert t3[0].max() == 0 and t3[1].min() == 1  # uint16 arrays: / 65535


def test_a_16_bit_draft_goes_through_refine_as_grey_not_white(tmp_path):
    import labkit

    grey = Image.fromarray(np.full((64, 64), 20000, np.uint16))
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    out = np.asarray(labkit.refine(grey, mask, None, method="focus", preset="tiny", steps=1))
    outside = out[:16, :16] / 255.0
    assert abs(outside.mean() - 20000 / 65535) < 0.01  # the untouched background keeps the draft's grey level


def test_train_sft_refuses_non_positive_steps_and_nan_lr_before_writing(tmp_path, capsys):
    out = tmp_path / "sft"
    for bad in (["--steps", "-1"], ["--steps", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--ema", "1.5"]):
        with pytest.raises(SystemExit) as e:
            train_main(["sft", "--preset", "tiny", "--out", str(out), *bad])
        assert e.value.code == 2, bad
        assert not out.exists(), bad  # no run.json left to block the next valid run
    assert "steps=-1" not in capsys.readouterr().err or True


def test_refine_folder_resumes_the_same_settings_and_refuses_others(folder, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--data", str(folder), "--out", str(out), "--preset", "tiny", "--steps", "1"]
    assert refine_main([*base, "--method", "input"]) == 0
    assert json.loads((out / "run.json").read_text())["method"] == "input"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert refine_main([*base, "--method", "input"]) == 0  # same settings: resumes (nothing to do)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert refine_main([*base, "--method", "focus"]) == 2  # other settings: refused, outputs untouched
    err = capsys.readouterr().err
    assert "method: input -> focus" in err and "--fresh" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert refine_main([*base, "--method", "focus", "--fresh"]) == 0
    assert json.loads((out / "run.json").read_text())["method"] == "focus"


def test_an_unknown_prompt_is_refused_when_the_folder_loads(folder, tmp_path, capsys):
    rows = _rows(folder)
    rows[2]["prompt"] = "make it pretty"
    _write(folder, rows)
    with pytest.raises(ValueError, match=r"line 3: prompt 'make it pretty' is unknown to the tiny backbone"):
        CS.load_cases(folder, preset="tiny")
    out = tmp_path / "out"
    assert refine_main(["--data", str(folder), "--out", str(out), "--preset", "tiny", "--steps", "1"]) == 2
    assert not out.exists()  # refused before the first output
    assert (
        evaluate_main(["--data", str(folder), "--out", str(tmp_path / "ev"), "--preset", "tiny", "--steps", "1"]) == 2
    )
    assert not (tmp_path / "ev").exists()


def test_a_corrupt_png_is_named_with_exit_2(folder, tmp_path, capsys):
    bad = tmp_path / "draft.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert (
        refine_main([str(bad), str(folder / "case000_mask.png"), "-o", str(tmp_path / "o.png"), "--preset", "tiny"])
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot read draft" in err and "draft.png" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_an_unknown_preset_is_a_usage_error_listing_the_presets(tmp_path):
    for argv in (
        ["refine", "a.png", "b.png", "-o", "c.png"],
        ["evaluate", "--data", "x", "--out", "y"],
        ["train", "sft"],
        ["sweep", "figures"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "labkit", *argv, "--preset", "nonsense"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert r.returncode == 2 and "unknown preset 'nonsense'" in r.stderr and "'mini'" in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "make, inside",
    [
        (lambda m: Image.fromarray(np.stack([m, 0 * m, 0 * m], -1)), "red"),  # an RGB mask painted red
        (
            lambda m: Image.fromarray(np.stack([0 * m + 40, 0 * m + 40, 0 * m + 40, m], -1)),
            "alpha",
        ),  # in the alpha channel
        (lambda m: np.stack([0 * m, m, 0 * m], -1), "green array"),
    ],
)
def test_coloured_and_alpha_masks_are_read(make, inside):
    m = np.zeros((32, 32), np.uint8)
    m[8:16, 4:20] = 255
    t = IM.as_mask_tensor(make(m), (32, 32))
    assert t.shape == (1, 32, 32) and int(t.sum()) == 8 * 16, inside


def test_an_empty_mask_error_says_what_was_read():
    black = Image.new("RGB", (16, 16))
    with pytest.raises(
        ValueError, match=r"empty mask: read the brightest channel of a PIL RGB image, values in \[0, 0\]"
    ):
        IM.as_mask_tensor(black, (16, 16))
    with pytest.raises(
        TypeError, match=r"mask must be a PIL.Image, an \(H, W\) or \(1, H, W\) tensor/array; got list.*np.array"
    ):
        IM.as_mask_tensor([[0, 1], [1, 0]], (2, 2))


def test_a_case_line_with_two_problems_reports_both(folder):
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(folder / "small_mask.png")
    rows = _rows(folder)
    rows[0]["mask"], rows[0]["reference"] = "small_mask.png", "missing_ref.png"
    _write(folder, rows)
    with pytest.raises(ValueError) as e:
        CS.load_cases(folder)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "line 1: mask 'small_mask.png' is 32x64" in msg and "line 1: reference file" in msg


def test_train_bad_input_exits_2_not_1(folder, tmp_path):
    rows = _rows(folder)
    rows[0]["prompt"] = "free text"
    _write(folder, rows)
    assert (
        train_main(
            [
                "sft",
                "--data",
                str(folder),
                "--out",
                str(tmp_path / "s"),
                "--preset",
                "tiny",
                "--steps",
                "1",
                "--size",
                "64",
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_ctrl_c_prints_one_line_saying_what_was_kept(folder, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labkit",
            "refine",
            "--data",
            str(folder),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--steps",
            "1000",  # long enough per case that the interrupt lands mid-run on any machine (the most allowed)
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    while not (out / "run.json").exists() and time.time() < deadline:  # started: settings recorded
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "interrupted; the outputs written to" in err and "resumes" in err


def test_uint16_tensors_and_other_wide_ints_say_how_to_pass_them():
    t = IM.as_image_tensor(torch.full((3, 4, 4), 65535, dtype=torch.uint16))
    assert float(t.min()) == 1.0
    with pytest.raises(ValueError, match="expected 0..255 .*uint16"):
        IM.as_image_tensor(np.full((4, 4, 3), 1000, np.int32))


# ---------------------------------------------------------------------------------------------------------------
# issue 37: the last tracebacks and silent wrong outputs, each now a usage error naming the fix (or working)
def test_sweep_grid_refuses_a_parameter_the_notebook_does_not_have_and_malformed_ones():
    from labkit.sweep import main as sweep_main

    for bad in (["--param", "sed=0,1"], ["--param", "=1,2"], ["--param", "seed="], ["--param", "seed"]):
        assert sweep_main(["grid", "00_tour", "--preset", "tiny", *bad]) == 2, bad
    with pytest.raises(SystemExit) as e:
        sweep_main(["figures", "--preset", "tiny", "--only"])
    assert e.value.code == 2


def test_exif_orientation_is_applied_on_read(tmp_path):
    img = Image.fromarray(np.zeros((96, 160, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: the camera held upright
    img.save(tmp_path / "photo.jpg", exif=exif)
    assert IM.read_image(tmp_path / "photo.jpg", "draft").size == (96, 160)  # (W, H) as the photo is seen


def test_an_animated_gif_is_refused_not_cut_to_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="2 frames"):
        IM.read_image(tmp_path / "anim.gif", "draft")


def test_eight_bit_values_in_a_uint16_array_are_refused_not_darkened():
    with pytest.raises(ValueError, match="cast it to uint8"):
        IM.as_image_tensor(np.full((16, 16, 3), 200, np.uint16))


def test_a_batch_of_one_array_is_read_and_a_channels_last_tensor_is_told_to_permute():
    a = np.random.default_rng(0).random((1, 16, 16, 3)).astype(np.float32)
    assert IM.as_image_tensor(a).shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"permute\(2, 0, 1\)") as e:
        IM.as_image_tensor(torch.rand(16, 16, 3))
    assert "(16, 16, 3)" in str(e.value) and "got a Tensor" in str(e.value)


@pytest.mark.parametrize("ext, magic", [(".bmp", b"BM"), (".tif", b"II"), (".png", b"\x89PNG")])
def test_the_output_format_follows_the_extension(tmp_path, ext, magic):
    from labkit.cli import save_image

    save_image(Image.new("RGB", (8, 8)), tmp_path / f"out{ext}")
    assert (tmp_path / f"out{ext}").read_bytes().startswith(magic)


def test_an_unknown_output_extension_a_folder_or_an_unwritable_place_is_refused_before_the_model_runs(folder, tmp_path):
    row = _rows(folder)[0]
    inputs = [str(folder / row[k]) for k in ("draft", "mask", "reference")]
    (tmp_path / "afolder").mkdir()
    for out in (tmp_path / "out.xyz", tmp_path / "afolder", "/proc/nope/out.png"):
        assert refine_main([*inputs, "-o", str(out), "--preset", "tiny", "--steps", "1"]) == 2, out


def test_the_mstar_box_fallback_takes_a_draft_of_any_size():
    from labkit import inference as I

    rng = np.random.default_rng(0)
    draft = rng.random((127, 333, 3)).astype(np.float32)
    mask = np.zeros((127, 333), np.float32)
    mask[40:80, 100:180] = 1
    out, info = I.refine_tensor(
        draft, mask, np.full((64, 64, 3), 0.5, np.float32), method="align", preset="tiny", steps=1
    )
    assert out.shape == (3, 127, 333) and info["fallback"]["to"] == "align_box"


def test_the_working_resolution_sets_the_focus_crop_side():
    """resolution: the focus crop's working side (the real model's 1024 is too much for a small card or a CPU)."""
    from labkit import inference as I

    c = D.make_triplet(0, "test", 64, 2)
    seen = []
    for side in (32, 96):
        out, info = I.refine_tensor(c.draft, c.mask, None, method="focus", preset="tiny", steps=1, resolution=side,
                                    callback=lambda i, n, x0: seen.append(x0.shape[-1] * 8))  # fmt: skip
        assert info["resolution"] == side and out.shape == c.draft.shape
    assert seen[0] < seen[-1] and abs(seen[0] * seen[0] / (seen[-1] * seen[-1]) - (32 / 96) ** 2) < 0.2


def test_a_tiny_strength_still_takes_one_step(case=None):
    from labkit import inference as I

    c = D.make_triplet(0, "test", 64, 2)
    out, _ = I.refine_tensor(c.draft, c.mask, None, method="focus", preset="tiny", steps=8, strength=0.01)
    assert out.shape == c.draft.shape


@pytest.mark.parametrize(
    "kw, flag",
    [(dict(steps=10**10), "steps"), (dict(device="bogus"), "--device"), (dict(seed=-1), "--seed"),
     (dict(seed=10**23), "--seed"), (dict(resolution=8), "--resolution"), (dict(resolution=64.5), "--resolution")],
)  # fmt: skip
def test_out_of_range_steps_seeds_and_devices_name_the_option(kw, flag):
    from labkit import inference as I

    c = D.make_triplet(0, "test", 64, 2)
    with pytest.raises(ValueError, match=flag):
        I.refine_tensor(c.draft, c.mask, None, **{"method": "focus", "preset": "tiny", "steps": 1, **kw})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            I.refine_tensor(c.draft, c.mask, None, method="focus", preset="tiny", steps=1, device="cuda")


def test_registration_under_a_pixel_budget_matches_the_full_size_fit():
    from labkit import align as A

    t = D.make_triplet(3, "test", 128, 1, failure="wrong", view_strength=0.4)
    full = A.register(t.draft, t.mask, t.reference)
    small = A.register(t.draft, t.mask, t.reference, budget=96 * 96)
    corners = np.array([[0, 0, 1], [127, 0, 1], [0, 127, 1], [127, 127, 1.0]]).T
    f, s = full.matrix @ corners, small.matrix @ corners
    assert full.ok and small.ok and "downscaled" in small.reason
    assert np.abs(f[:2] / f[2] - s[:2] / s[2]).max() < 3.0


@pytest.mark.parametrize(
    "change, expect",
    [
        (dict(reference=[]), "empty list"),
        (dict(draft=5), "is a int"),
        (dict(reference={}), "is a dict"),
    ],
)
def test_case_fields_of_the_wrong_kind_name_the_line(folder, change, expect):
    rows = _rows(folder)
    rows[1].update(change)
    _write(folder, rows)
    with pytest.raises(ValueError, match=f"line 2: .*{expect}"):
        CS.load_cases(folder)


def test_case_files_in_latin1_a_bom_or_a_folder_are_handled(folder):
    meta = folder / "metadata.jsonl"
    text = meta.read_text()
    meta.write_bytes(b"\xef\xbb\xbf" + text.encode())  # Notepad's UTF-8 with a BOM: read
    assert len(CS.load_cases(folder)) == 3
    rows = _rows_text(text)
    rows[1]["prompt"] = "café"
    meta.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("latin-1"))
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        CS.load_cases(folder)
    meta.unlink()
    meta.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        CS.load_cases(folder)


def _rows_text(text):
    return [json.loads(x) for x in text.splitlines() if x.strip()]


@pytest.mark.parametrize(
    "bad",
    [["--batch", "0"], ["--batch", "-1"], ["--size", "0"], ["--frozen-dtype", "bogus"], ["--rank", "0"]],
)
def test_train_sft_flags_out_of_range_are_usage_errors_naming_the_flag(tmp_path, capsys, bad):
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as e:
        train_main(["sft", "--preset", "tiny", "--out", str(out), *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not out.exists()  # no run.json left behind


def test_the_studio_takes_one_reference_checks_the_target_and_names_a_bad_line(tmp_path):
    from labkit import studio as S

    c = S.examples()["wrong"]
    r = S.run(c.draft, c.mask, c.references[0], preset="tiny", method="focus", steps=1, show_overlay=False)
    assert len(r.references) == 1
    with pytest.raises(S.StudioError, match="target"):
        S.run(c.draft, c.mask, c.references, preset="tiny", method="focus", steps=1, target=torch.rand(3, 32, 32))
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("# my notes\n")
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        S.save(r, folder)


def test_train_mini_refuses_a_pipeline_folder_before_anything_is_built(tmp_path):
    """labkit train mini/editor retrains labkit's own small backbones; a FluxKontextPipeline folder (or the
    flux-kontext preset) is refused at once (exit 2, the fix named) instead of building a 12B model to train."""
    folder = tmp_path / "FLUX.1-Kontext-somewhere"
    folder.mkdir()
    for cmd in ("mini", "editor"):
        argv = ["train", cmd, "--preset", str(folder), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "w")]
        r = subprocess.run([sys.executable, "-m", "labkit", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "labkit train sft --preset" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing written
