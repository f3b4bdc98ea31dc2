"""Bring your own cases: a case folder (metadata.jsonl), validated up front; the refine, evaluate and train
command lines on it (tiny preset, a folder the test writes)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from labkit import cases as CS
from labkit import data as D


@pytest.fixture()
def folder(tmp_path):
    trips = [D.make_triplet(i, "test", 64, 2) for i in range(6)]
    return CS.write_cases(
        tmp_path / "cases",
        trips,
        prompts=["refine", None, "restore", None, None, "refine"],
        splits=["train", "train", "train", "val", "test", "test"],
    )


def _lines(folder):
    return [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]


def _write(folder, rows):
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n")


def test_load_cases_reads_splits_prompts_and_pixels(folder):
    cases = CS.load_cases(folder)
    assert [c.split for c in cases] == ["train", "train", "train", "val", "test", "test"]
    assert cases[0].prompt == "refine" and cases[1].prompt is None
    t = D.make_triplet(0, "test", 64, 2)
    assert (cases[0].target - t.target).abs().max() < 1 / 255 and (cases[0].mask == t.mask).all()
    assert [c.name for c in CS.load_cases(folder, "test")] == ["case004", "case005"]
    rows = _lines(folder)
    for r in rows:
        r.pop("split")
    _write(folder, rows)
    by_name = {c.name: c.split for c in CS.load_cases(folder)}
    _write(folder, rows[::-1])  # the split follows each case's draft path, not its line
    assert {c.name: c.split for c in CS.load_cases(folder)} == by_name
    assert [c.split for c in CS.load_cases(folder)] == [CS._split_of(r["draft"]) for r in rows[::-1]]


def test_the_split_rule_is_80_10_10_and_stable():
    splits = [CS._split_of(f"drafts/img{i:04d}.png") for i in range(2000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["val"] - 0.1) < 0.02 and abs(share["test"] - 0.1) < 0.02
    assert [CS._split_of(f"drafts/img{i:04d}.png") for i in range(2000)] == splits  # a stable hash, not Python's


@pytest.mark.parametrize(
    "change, expect",
    [
        (
            lambda r: r[1].update(draft="missing.png"),
            r"line 2: draft file 'missing.png' not found in .*relative to the folder",
        ),
        (lambda r: r[2].update(split="holdout"), r"line 3: unknown split 'holdout'"),
        (lambda r: r.append(dict(r[0])), r"line 7: duplicates line 1"),
        (lambda r: r[0].pop("mask"), r"line 1: needs draft, reference and mask"),
        (lambda r: r.insert(1, "{not json"), r"line 2: not valid JSON"),
    ],
)
def test_bad_folders_name_the_line_the_file_and_the_fix(folder, change, expect):
    rows = _lines(folder)
    change(rows)
    _write(folder, rows)
    with pytest.raises(ValueError, match=expect):
        CS.load_cases(folder)


def test_mask_size_empty_mask_and_unreadable_files_are_caught(folder):
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(folder / "small_mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "empty_mask.png")
    (folder / "broken.png").write_text("not an image")
    rows = _lines(folder)
    rows[0]["mask"], rows[1]["mask"], rows[2]["reference"] = (
        "small_mask.png",
        "empty_mask.png",
        ["case002_ref.png", "broken.png"],
    )
    _write(folder, rows)
    with pytest.raises(ValueError) as e:
        CS.load_cases(folder)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "line 1: mask 'small_mask.png' is 32x64 but the draft is 64x64" in msg
    assert "line 2: mask 'empty_mask.png': empty mask" in msg and "line 3: cannot read reference 'broken.png'" in msg


def test_refine_cli_one_case_and_a_folder_that_resumes(folder, tmp_path):
    from labkit.cli import refine_main as main

    out = tmp_path / "one.png"
    assert (
        main(
            [
                str(folder / "case000_draft.png"),
                str(folder / "case000_mask.png"),
                str(folder / "case000_ref.png"),
                "-o",
                str(out),
                "--preset",
                "tiny",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert Image.open(out).size == (64, 64)
    res = tmp_path / "all"
    assert main(["--data", str(folder), "--out", str(res), "--preset", "tiny", "--steps", "1", "--split", "test"]) == 0
    done = sorted(p.name for p in res.glob("*.png"))
    assert done == ["case004.png", "case005.png"]
    stamp = (res / "case004.png").stat().st_mtime_ns
    (res / "case005.png").unlink()  # as if the run had been interrupted
    assert main(["--data", str(folder), "--out", str(res), "--preset", "tiny", "--steps", "1", "--split", "test"]) == 0
    assert (res / "case005.png").exists() and (res / "case004.png").stat().st_mtime_ns == stamp  # done cases skipped
    assert main([str(folder / "nope.png"), str(folder / "case000_mask.png"), "-o", str(out), "--preset", "tiny"]) == 2


@pytest.mark.parametrize(
    "cmd, args",
    [
        ("refine", ["d.png", "m.png", "-o", "o.png"]),
        ("evaluate", ["--data", "x", "--out", "y"]),
        ("train sft", []),
        ("train mini", []),
        ("train editor", []),
        ("sweep grid", ["03"]),
        ("sweep figures", []),
    ],
)
def test_every_subcommand_has_help_with_an_example_and_refuses_unknown_arguments(cmd, args):
    ok = subprocess.run(
        [sys.executable, "-m", "labkit", *cmd.split(), "--help"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0 and "usage: labkit" in ok.stdout and "example" in ok.stdout, ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "labkit", *cmd.split(), *args, "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-option" in bad.stderr


def test_the_labkit_command_lists_its_subcommands_and_refuses_an_unknown_one():
    ok = subprocess.run([sys.executable, "-m", "labkit", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and all(f"labkit {c}" in ok.stdout for c in ("refine", "evaluate", "train", "sweep"))
    bad = subprocess.run([sys.executable, "-m", "labkit", "polish"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown command 'polish'" in bad.stderr


@pytest.mark.slow
def test_evaluate_cli_writes_the_tables_and_claims(folder, tmp_path):
    from labkit.evaluate import main

    out = tmp_path / "eval"
    assert (
        main(
            ["--data", str(folder), "--out", str(out), "--preset", "tiny", "--steps", "1", "--methods", "full", "focus"]
        )
        == 0
    )
    assert {"per_case.csv", "table.csv", "table.html", "table.png", "qualitative.png", "results.json"} <= {
        p.name for p in out.iterdir()
    }
    r = json.loads((out / "results.json").read_text())
    assert {"best_model_beats_input", "background_exact"} <= set(r["claims"]) and r["n_cases"] == 6
    assert r["claims"]["background_exact"]["holds"]  # focus pastes back: pixels outside the box are the input's
    rows = _lines(folder)
    rows[0].pop("target")
    _write(folder, rows)
    assert main(["--data", str(folder), "--out", str(tmp_path / "e2"), "--preset", "tiny", "--steps", "1"]) == 2
    assert not (tmp_path / "e2").exists()  # refused before any work: nothing half-written


@pytest.mark.slow
def test_train_sft_on_a_case_folder_with_per_case_prompts(folder, tmp_path):
    from labkit.train import main

    out = tmp_path / "sft"
    main(
        [
            "sft",
            "--data",
            str(folder),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--size",
            "64",
            "--batch",
            "2",
            "--rank",
            "2",
            "--val-images",
            "1",
            "--mixed-precision",
            "no",
        ]
    )
    spec = json.loads((out / "adapter" / "adapter.json").read_text())
    assert spec["sft"]["data_dir"] == str(folder) and spec["preset"] == "tiny"
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["sft"]["data_dir"] == str(folder)
    rows = _lines(folder)
    rows[0]["prompt"] = "make the logo sharp"  # free text on a learned-instruction backbone: refused before training
    _write(folder, rows)
    assert (
        main(
            [
                "sft",
                "--data",
                str(folder),
                "--out",
                str(tmp_path / "sft2"),
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
def test_notebooks_04_and_05_take_a_case_folder(folder, tmp_path):
    from test_notebooks import SMALL

    from labkit.sweep import notebooks as nbs
    from labkit.sweep import run_notebook

    r5 = run_notebook(
        nbs(["05_evaluate"])[0], tmp_path / "05", preset="tiny", **{**SMALL["05_evaluate"], "data_dir": str(folder)}
    )
    assert r5["n_cases"] == 2 and r5["params"]["n_per_kind"] == 1  # the folder's test split, not the built-in set
    r4 = run_notebook(
        nbs(["04_train_freqmole"])[0],
        tmp_path / "04",
        preset="tiny",
        **{**SMALL["04_train_freqmole"], "data_dir": str(folder)},
    )
    assert r4["claims"] and (tmp_path / "04" / "adapters" / "lora" / "adapter.json").exists()
