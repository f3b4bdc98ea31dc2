"""Never lose a user's file: the five ways a command once overwrote or deleted what it did not write (issue 37).
Each runs the command on tiny, expects a usage error (exit 2) before any work, and checks that every input file's
bytes are unchanged."""

import hashlib
import json
from pathlib import Path

import pytest

from labkit import cases as CS
from labkit import data as D
from labkit.cli import refine_main
from labkit.train import main as train_main


def _fingerprint(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (what must not change)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture()
def cases(tmp_path):
    trips = [D.make_triplet(i, "test", 64, 2) for i in range(2)]
    return CS.write_cases(tmp_path / "cases", trips, splits=["test"] * 2)


def test_fresh_never_deletes_the_case_folder_it_reads(cases, capsys):
    before = _fingerprint(cases)
    argv = ["--data", str(cases), "--out", str(cases), "--preset", "tiny", "--steps", "1", "--method", "focus"]
    assert refine_main([*argv, "--fresh"]) == 2
    assert "input" in capsys.readouterr().err
    assert _fingerprint(cases) == before


def test_fresh_refuses_a_folder_labkit_did_not_write(cases, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    before = _fingerprint(mine)
    argv = ["--data", str(cases), "--out", str(mine), "--preset", "tiny", "--steps", "1", "--method", "focus"]
    assert refine_main([*argv, "--fresh"]) == 2
    assert "labkit wrote" in capsys.readouterr().err
    assert _fingerprint(mine) == before
    assert refine_main(argv) == 2  # without --fresh too, and the message no longer recommends --fresh
    assert "--fresh to replace" not in capsys.readouterr().err
    assert _fingerprint(mine) == before


@pytest.mark.parametrize("which", ["draft", "mask", "reference"])
def test_the_output_may_not_be_an_input(cases, which, capsys):
    row = json.loads((cases / "metadata.jsonl").read_text().splitlines()[0])
    files = [cases / row["draft"], cases / row["mask"], cases / row["reference"]]
    before = _fingerprint(cases)
    out = dict(draft=files[0], mask=files[1], reference=files[2])[which]
    assert refine_main([*map(str, files), "-o", str(out), "--preset", "tiny", "--steps", "1"]) == 2
    assert "input" in capsys.readouterr().err
    assert _fingerprint(cases) == before


def test_train_refuses_a_folder_labkit_did_not_write(cases, tmp_path, capsys):
    mine = tmp_path / "experiment"
    (mine / "adapter").mkdir(parents=True)
    (mine / "metrics.csv").write_text("my,own,numbers\n")
    (mine / "adapter" / "notes.md").write_text("notes")
    before = _fingerprint(mine)
    argv = ["sft", "--preset", "tiny", "--data", str(cases), "--out", str(mine), "--steps", "1", "--size", "64"]
    for extra in ([], ["--fresh"]):
        assert train_main([*argv, *extra]) == 2
        assert "labkit did not write it" in capsys.readouterr().err
        assert _fingerprint(mine) == before


@pytest.mark.parametrize(
    "ids, expect",
    [
        (["a", "./a"], "separator"),  # "./a" and "a" would write one a.png
        (["a", "A"], "same output file"),  # the same file on a case-insensitive disk
        (["../../x", "b"], "separator"),  # outside --out
        (["/tmp/x", "b"], "separator"),  # an absolute path
        (["", "b"], "empty"),
        ([".", "b"], "hidden"),
        ([".hidden", "b"], "hidden"),
        ([True, "b"], "string or an integer"),
    ],
)
def test_case_ids_are_file_names_that_stay_inside_out(cases, ids, expect, tmp_path):
    lines = [json.loads(x) for x in (cases / "metadata.jsonl").read_text().splitlines()]
    for row, i in zip(lines, ids):
        row["id"] = i
    (cases / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(ValueError, match=expect):
        CS.load_cases(cases)
    out = tmp_path / "out"
    assert refine_main(["--data", str(cases), "--out", str(out), "--preset", "tiny", "--steps", "1"]) == 2
    assert not (tmp_path / "x.png").exists() and not Path("/tmp/x.png").exists()
    assert not out.exists() or not list(out.glob("*.png"))


def test_an_integer_id_zero_is_kept(cases):
    lines = [json.loads(x) for x in (cases / "metadata.jsonl").read_text().splitlines()]
    lines[0]["id"], lines[1]["id"] = 0, 1
    (cases / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert [c.name for c in CS.load_cases(cases)] == ["0", "1"]


def test_fresh_still_replaces_labkits_own_output(cases, tmp_path):
    out = tmp_path / "out"
    argv = ["--data", str(cases), "--out", str(out), "--preset", "tiny", "--steps", "1", "--method", "focus"]
    assert refine_main(argv) == 0
    stale = out / "0.png"
    stale.write_bytes(b"left from an earlier run")
    assert refine_main([*argv, "--fresh"]) == 0
    assert not stale.exists() and (out / "run.json").exists()


@pytest.mark.parametrize("bad", [["--seed", "-1"], ["--seed", str(10**23)], ["--device", "bogus"], ["--steps", "5000"]])
def test_a_bad_option_writes_nothing_into_out(cases, tmp_path, bad, capsys):
    out = tmp_path / "out"
    assert refine_main(["--data", str(cases), "--out", str(out), "--preset", "tiny", *bad]) == 2
    assert bad[0] in capsys.readouterr().err and not out.exists()
