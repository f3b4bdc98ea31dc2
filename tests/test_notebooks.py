"""Every research notebook runs headlessly through papermill on `tiny` and writes a results.json
whose claims are well-formed; assertions are on that file, never on cell output."""

import math
import os

import pytest

from labkit.sweep import notebooks, run_notebook

SMALL = {  # small sizes per notebook so the suite stays in minutes on 2 cores
    "00_mini_backbone": dict(retrain_steps=2, n_eval=2, n_copy=8, sample_steps=2),
    "01_attention_correspondence": dict(n_pairs=3, n_calib=2, timesteps=[1.0, 0.5], sample_steps=2, size=64),
    "00_tour": dict(n_triplets=2),
    "02_latent_frequency": dict(n_triplets=6, size=64),
    "04_train_freqmole": dict(steps=4, bank=4, batch=2, size=64, n_val=2, sample_steps=2),
    "03_vae_crop_vs_full": dict(n_images=3, fracs=[0.05, 0.4], upsamples=[2, "work"]),
    "05_evaluate": dict(
        n_per_kind=1,
        n_val_per_kind=1,
        kinds=["wrong", "smear"],
        ceiling_room=-100.0,
        size=64,
        steps=2,
        adapter_source="train",
        adapter_steps=2,
        adapters=["lora", "freqmole", "freqmole+boundary"],
        n_object_per_kind=1,
        n_shift_per_kind=1,
        n_harm_per_kind=2,
        n_val_v3_per_kind=1,
    ),
    "07_studio": dict(steps=2),
    "06_reward_finetune": dict(
        adapter_source="train",
        sft_steps=1,
        steps=2,
        group=2,
        inputs=1,
        sample_steps=2,
        eval_steps=2,
        bank=2,
        n_val=1,
        n_per_degradation=1,
        degradations=["blur", "glyph"],
        study_k=[1, 2],
        study_budgets=[0.5, 1.0],
        n_study=2,
        size=64,
        budgets=[0.5, 1.0],
    ),
}


# claims that hold on any backbone (they test the method's bookkeeping, not the model), and the file whose
# numbers the claim's value must be recomputable from: (csv, column, reduction)
INVARIANT = {
    "03_vae_crop_vs_full": ("focus_paste_background_exact", "seams.csv", "bg_changed_pixels", "sum"),
    "05_evaluate": ("background_exact", "per_case.csv", "bg_box_maxabs", "max"),
    "07_studio": ("studio_background_untouched", "studio_runs.csv", "changed_outside_box", "sum"),
}


# on a FluxKontextPipeline folder (the real model's layout, tiny weights): what differs from `tiny`
PIPELINE = {
    "00_mini_backbone": dict(retrain_steps=0),  # evaluates the pipeline as it is (retraining it is refused)
    "01_attention_correspondence": dict(prompt="the red logo on the sign"),  # free text reaches T5 + CLIP
    "04_train_freqmole": dict(quantize="int8", prompt="make the lettering sharp", n_val=1),  # QLoRA-style base
    "05_evaluate": dict(
        resolution=64, prompt="fix the lettering", kinds=["wrong"], n_nonplanar_per_kind=1, adapters=["lora"]
    ),
    "07_studio": dict(resolution=64),  # the focus crop's working side (the pipeline's own is 1024)
}


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny FluxKontextPipeline saved with save_pretrained (guidance-distilled, FLUX's scheduler, CLIP + T5)."""
    from test_flux_loader import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("pipe"), flux_like=True)[1]


def _check_record(r: dict, preset: str) -> None:
    """A results.json as every notebook writes it: claims with a verdict and, for comparisons, CI/MDE/effect."""
    assert r["preset"] == preset and r["claims"] and "torch" in r["versions"] and r["git"]
    for name, c in r["claims"].items():
        assert {"value", "baseline", "holds", "unit", "paper", "verdict"} <= set(c), name
        assert isinstance(c["holds"], bool) and c["holds"] == (c["verdict"] == "holds")
        assert isinstance(c["value"], (int, float)) and not math.isnan(c["value"]), name
        if c.get("exact"):  # an exact count or a bit-exact check: no CI, says so
            assert "ci" not in c and c["verdict"] in ("holds", "refuted"), name
        else:  # a comparison: CI of the difference, MDE, the effect judged against and where it comes from
            lo, hi = c["ci"]
            assert lo <= c["diff"] <= hi and c["mde"] >= 0 and c["paper_effect_source"], name
            assert (c["verdict"] == "inconclusive") == ("budget" in c), name


@pytest.mark.slow
@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_on_tiny(nb, tmp_path):
    r = run_notebook(nb, tmp_path / nb.stem, preset="tiny", **SMALL.get(nb.stem, {}))
    _check_record(r, "tiny")
    assert list((tmp_path / nb.stem).glob("*.png")), "a notebook saves its figures"
    if (
        nb.stem in INVARIANT
    ):  # bookkeeping claims hold even on random weights, and their value comes from the saved numbers
        import pandas as pd

        name, csv, col, how = INVARIANT[nb.stem]
        df = pd.read_csv(tmp_path / nb.stem / csv)
        if "method" in df and nb.stem == "05_evaluate":
            df = df[df.method.str.endswith(("/focus", "/align", "/align_box"))]
        assert r["claims"][name]["holds"], (name, r["claims"][name])
        assert r["claims"][name]["value"] == pytest.approx(float(getattr(df[col], how)()))


@pytest.mark.slow
@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_on_a_pipeline_folder(nb, pipeline_folder, tmp_path):
    """The same notebook with preset=<a FluxKontextPipeline folder>: the path to the real model, end to end."""
    r = run_notebook(
        nb, tmp_path / nb.stem, preset=str(pipeline_folder), **SMALL.get(nb.stem, {}) | PIPELINE.get(nb.stem, {})
    )
    _check_record(r, str(pipeline_folder))
    if nb.stem in PIPELINE and "resolution" in PIPELINE[nb.stem]:  # the working side reached labkit.refine
        assert r["params"]["resolution"] == PIPELINE[nb.stem]["resolution"]


@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_notebook_hygiene(nb):
    """Committed notebooks: stripped outputs, exactly one `parameters` cell with out_dir/preset, a kernelspec."""
    import json

    d = json.loads(nb.read_text())
    assert d["metadata"]["kernelspec"]["name"] == "python3"
    params = [c for c in d["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "preset" in "".join(params[0]["source"]) and "out_dir" in "".join(params[0]["source"])
    assert not any(c.get("outputs") or c.get("execution_count") for c in d["cells"] if c["cell_type"] == "code")
    assert d["cells"][0]["cell_type"] == "markdown"


@pytest.mark.slow
def test_sweep_collects_points_into_one_table(tmp_path):
    import pandas as pd

    from labkit.sweep import grid

    csv = grid(
        "03_vae_crop_vs_full",
        {"seed": [0, 1]},
        preset="tiny",
        out=tmp_path,
        extra=dict(n_images=2, fracs=[0.05, 0.4], upsamples=["work"]),
    )
    table = pd.read_csv(csv)
    assert list(table.seed) == [0, 1]
    assert "crop_beats_full_small_regions" in table and "crop_beats_full_small_regions_verdict" in table
    assert table.crop_beats_full_small_regions.nunique() == 2  # different seeds, different numbers


@pytest.mark.slow
def test_slurm_sweep_through_submitit_local_executor_fails_one_point_and_resumes(tmp_path):
    """`--executor slurm` on submitit's local executor (real processes, one job array): a failing point becomes a
    row with its error and log, the table is the local executor's, and a rerun skips what is done."""
    import json

    import pandas as pd

    from labkit.sweep import grid

    kw = dict(
        preset="tiny",
        out=tmp_path,
        extra=dict(n_images=2, fracs=[0.05, 0.4], upsamples=["work"]),
        executor="slurm",
        cluster=dict(cluster="local", partition="ignored-here", time=10),
    )
    csv = grid("03_vae_crop_vs_full", {"seed": [0, 1], "size": [64, 8]}, **kw)
    table = pd.read_csv(csv)
    assert list(table.point) == ["seed-0_size-64", "seed-0_size-8", "seed-1_size-64", "seed-1_size-8"]  # grid order
    ok, bad = table[table.status == "ok"], table[table.status != "ok"]
    assert list(ok.point) == ["seed-0_size-64", "seed-1_size-64"] and ok.crop_beats_full_small_regions.nunique() == 2
    assert len(bad) == 2 and all(bad.error.str.len() > 0) and all(os.path.exists(p) for p in bad.log)
    assert (tmp_path / "submitit").is_dir()
    stamp = {p: (tmp_path / p / "results.json").stat().st_mtime for p in ok.point}
    grid("03_vae_crop_vs_full", {"seed": [0, 1], "size": [64, 8]}, **kw)  # resume: the done points are kept as they are
    again = json.loads((tmp_path / "table.json").read_text())
    assert [r["status"] for r in again] == list(table.status)
    assert stamp == {p: (tmp_path / p / "results.json").stat().st_mtime for p in ok.point}


@pytest.mark.slow
def test_figures_runs_notebooks_two_at_a_time_and_records_their_seconds(tmp_path, monkeypatch):
    """`make figures`' runner: two notebooks side by side (one thread each) land in figures/<stem>/ with their
    results, their seconds in timings.json and their claims in SUMMARY.md; a bad jobs count is refused."""
    import json

    from labkit import sweep

    monkeypatch.setattr(sweep, "FIGURES", tmp_path)
    sweep.figures("tiny", only=["00_tour", "07_studio"], jobs=2)
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings) == {"00_tour", "07_studio"} and all(v >= 0 for v in timings.values())
    for stem in timings:
        _check_record(json.loads((tmp_path / stem / "results.json").read_text()), "tiny")
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| 00_tour (tiny) |" in summary and "| 07_studio (tiny) |" in summary
    with pytest.raises(ValueError, match="--jobs 1"):
        sweep.figures("tiny", only=["00_tour"], jobs=0)


def test_kernels_talk_over_private_ipc_sockets():
    """Notebook kernels use IPC sockets under a folder of their own (absolute), never a TCP port two kernels started
    at once could both be handed."""
    import os

    from labkit import sweep

    km = sweep.kernel_config("sockets").KernelManager
    assert km.transport == "ipc" and os.path.isabs(km.ip) and km.ip == os.path.join(os.getcwd(), "sockets", "kernel")
