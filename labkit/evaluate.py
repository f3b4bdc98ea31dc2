"""Evaluation tables on the fixed test set: RefineEval-style (region / background) and RefGC-SR2-style
(whole image) columns, per-degradation and per-content breakdowns, bootstrap confidence intervals.

Conventions: region metrics compare the output with HRGT inside the mask; background metrics compare the
output with the *input* (draft) outside the mask - preservation, as RefineEval's MSE_bg; whole-image
metrics compare with HRGT. `bg_box_mse` is the MSE outside the Focus paste box (0 = bit-identical).
HF fidelity is reported as region_hf_err = |log2(HF energy ratio)| (0 = the target's detail energy;
the raw ratio is heavy-tailed on flat regions, so its mean is not a useful summary).
The eval set shows each scene under several degradations, so confidence intervals resample *scenes*
(cluster bootstrap), not cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import data as D
from . import focus as F_
from . import inference as I
from . import metrics as Mt
from . import objects as O
from .cases import load_cases, require_targets
from .data import make_triplet
from .metrics import bootstrap_ci
from .presets import check_preset
from .results import claim, paper_effect, write_results
from .util import atomic_dir, atomic_save, case_seed, claim_out_dir, run_cli, write_json

# column -> which direction is better ("max", "min", or "one": closest to 1)
COLUMNS = {
    "region_mse": "min",
    "region_psnr": "max",
    "region_ssim": "max",
    "region_hf_err": "min",
    "mse_bg": "min",
    "ssim_bg": "max",
    "psnr": "max",
    "ssim": "max",
    "lpips": "min",
    "dino": "max",
    "clip": "max",
}
PERCEPTUAL = {"lpips": "LABKIT_LPIPS", "dino": "LABKIT_DINO", "clip": "LABKIT_CLIP"}


def perceptual_models() -> dict:
    """DINO / CLIP similarity from local folders named by LABKIT_DINO / LABKIT_CLIP; LPIPS needs torchvision,
    which has no CPU wheel here, so it is always unavailable. name -> callable or a reason string."""
    out = {}
    for name, env in PERCEPTUAL.items():
        path = os.environ.get(env)
        if name == "lpips":
            out[name] = "unavailable: LPIPS needs torchvision (no CPU wheel here) and its VGG/AlexNet weights"
        elif not path:
            out[name] = f"unavailable: set {env}=/local/folder (a transformers {name.upper()} checkpoint)"
        else:
            out[name] = Mt.FeatureSimilarity(path)
    return out


def score(out: torch.Tensor, case, draft: torch.Tensor, box=None, perceptual: dict | None = None) -> dict:
    """One output (3, H, W) of a case as a row of floats: labkit.metrics.case_row (region and whole vs HRGT,
    background vs the
    draft, outside the paste box) plus the perceptual columns that have local weights."""
    row = Mt.case_row(out, case.target, case.mask, draft, box)
    for name, fn in (perceptual or {}).items():
        row[name] = float(fn(out[None], case.target[None])) if callable(fn) else float("nan")
    return row


def run(
    cases: Sequence,
    runners: dict[str, Callable],
    draft_fn: Callable,
    progress: bool = True,
    perceptual: dict | None = None,
    keep: Sequence[int] = range(4),
    indices: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Every runner on every case: runners[name](case) -> (output (3,H,W), info); one row per (case, runner name,
    in the `method` column).
    Returns the rows and, per method, the outputs of the cases in `keep` (for the qualitative grid). indices:
    the cases' numbers in the whole set (a shard of it), else 0..n-1."""
    indices = list(range(len(cases))) if indices is None else list(indices)
    rows, samples = [], {}
    bar = tqdm(total=len(cases) * len(runners), disable=not progress, desc="evaluate", mininterval=5)
    for name, fn in runners.items():
        t0 = time.time()
        for i, c in zip(indices, cases):
            out, info = fn(c)
            rows.append(
                dict(
                    method=name,
                    case=i,
                    scene=c.meta["seed"],
                    content=c.meta["content"],
                    degradation=c.meta["degradation"],
                    **score(out, c, draft_fn(c), info.get("box"), perceptual),
                )
            )
            if i in keep:
                samples.setdefault(name, {})[i] = out
            bar.update(1)
        for r in rows[-len(cases) :] if cases else []:
            r["seconds_per_case"] = (time.time() - t0) / len(cases)
    bar.close()
    return pd.DataFrame(rows), {k: [v[i] for i in keep if i in v] for k, v in samples.items()}


def processes():
    """accelerate's PartialState (N processes under accelerate launch, CPU ones joining a gloo group; 1 alone)."""
    from accelerate import PartialState  # heavy: imported where used

    return PartialState(cpu=not torch.cuda.is_available())


def run_sharded(
    cases: Sequence,
    runners: dict[str, Callable],
    draft_fn: Callable,
    progress: bool = True,
    perceptual: dict | None = None,
    keep: Sequence[int] = range(4),
) -> tuple[pd.DataFrame, dict] | None:
    """`run` split across the processes of `accelerate launch` (accelerate's split_between_processes: contiguous
    shards of the cases); every rank's rows and kept outputs are gathered, and the main process gets the
    whole table (rows in the order one process writes them), the others None. Alone: `run`."""
    from accelerate.utils import gather_object

    state = processes()
    if state.num_processes == 1:
        return run(cases, runners, draft_fn, progress, perceptual, keep)
    with state.split_between_processes(list(range(len(cases)))) as mine:
        df, samples = run(
            [cases[i] for i in mine],
            runners,
            draft_fn,
            progress and state.is_main_process,
            perceptual,
            keep,
            indices=mine,
        )
    parts = gather_object(
        [
            (
                df.to_dict(orient="records"),
                {k: {i: v[j] for j, i in enumerate(sorted(set(keep) & set(mine)))} for k, v in samples.items()},
            )
        ]
    )
    if not state.is_main_process:
        return None
    order = {m: k for k, m in enumerate(runners)}
    rows = sorted((r for recs, _ in parts for r in recs), key=lambda r: (order[r["method"]], r["case"]))
    merged: dict = {}
    for _, smp in parts:
        for k, v in smp.items():
            merged.setdefault(k, {}).update(v)
    return pd.DataFrame(rows), {k: [v[i] for i in keep if i in v] for k, v in merged.items()}


def paired(df: pd.DataFrame, a: str, b: str, col: str = "region_psnr", seed: int = 0) -> dict:
    """Paired difference a - b over the same cases: mean, bootstrap 95% CI, and the two means."""
    pa = df[df.method == a].set_index("case")[col]
    pb = df[df.method == b].set_index("case")[col]
    d = (pa - pb.reindex(pa.index)).dropna()
    scenes = df[df.method == a].set_index("case").scene.reindex(d.index) if "scene" in df else None
    lo, hi = bootstrap_ci(d.values, seed=seed, groups=None if scenes is None else scenes.values)
    return dict(
        a=a,
        b=b,
        column=col,
        value=float(pa.mean()),
        baseline=float(pb.mean()),
        diff=float(d.mean()),
        ci_low=lo,
        ci_high=hi,
        n=int(len(d)),
        n_scenes=int(scenes.nunique()) if scenes is not None else int(len(d)),
        diffs=d.values,
        groups=None if scenes is None else scenes.values,
    )


def table(
    df: pd.DataFrame, by: str | list[str] = "method", columns: Sequence[str] | None = None, seed: int = 0
) -> pd.DataFrame:
    """Mean per group for each metric column, with '<col>_lo' / '<col>_hi' bootstrap 95% bounds."""
    cols = [c for c in (columns or COLUMNS) if c in df]
    out = []
    for key, g in df.groupby(by, sort=False):
        row = dict(zip([by] if isinstance(by, str) else by, key if isinstance(key, tuple) else (key,)))
        for c in cols:
            lo, hi = bootstrap_ci(g[c].values, seed=seed, groups=g.scene.values if "scene" in g else None)
            row[c], row[f"{c}_lo"], row[f"{c}_hi"] = float(g[c].mean()), lo, hi
        row["n"] = len(g)
        out.append(row)
    return pd.DataFrame(out)


def best(tab: pd.DataFrame, columns: Sequence[str] | None = None) -> dict[str, str]:
    """The best method per column (direction from COLUMNS; NaN columns skipped)."""
    out = {}
    for c in columns or COLUMNS:
        if c not in tab or tab[c].isna().all():
            continue
        s = tab.set_index("method")[c]
        how = COLUMNS[c]
        out[c] = str((s - 1).abs().idxmin() if how == "one" else s.idxmax() if how == "max" else s.idxmin())
    return out


def render(
    tab: pd.DataFrame, columns: Sequence[str], unavailable: dict[str, str], path_html: str, title: str = ""
) -> str:
    """HTML table: mean [95% CI] per cell, the best per column in bold, unavailable columns say why."""
    win = best(tab, columns)
    head = "".join(f"<th>{c}</th>" for c in ["method", *columns, *unavailable])
    body = []
    for _, r in tab.iterrows():
        cells = [f"<td>{r['method']}</td>"]
        for c in columns:
            txt = f"{r[c]:.4g} <small>[{r[c + '_lo']:.3g}, {r[c + '_hi']:.3g}]</small>"
            cells.append(f"<td><b>{txt}</b></td>" if win.get(c) == r["method"] else f"<td>{txt}</td>")
        cells += [f"<td title='{why}'>unavailable</td>" for why in unavailable.values()]
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{k}: {v}</li>" for k, v in unavailable.items())
    html = (
        f"<h3>{title}</h3><table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{''.join(body)}</table>"
        f"<p>bold: best per column. [95% bootstrap CI, scenes resampled]</p><ul>{notes}</ul>"
    )

    atomic_save(lambda p: open(p, "w").write(html), path_html)
    return html


def table_figure(tab: pd.DataFrame, columns: Sequence[str], title: str = ""):
    """The same table as a matplotlib figure (PNG): means, best per column highlighted."""
    import matplotlib.pyplot as plt  # heavy: imported where used

    win = best(tab, columns)
    cells = [[f"{r[c]:.3g}" for c in columns] for _, r in tab.iterrows()]
    fig, ax = plt.subplots(figsize=(1.0 + 0.95 * len(columns), 0.3 * (len(tab) + 2)))
    ax.axis("off")
    t = ax.table(cellText=cells, rowLabels=list(tab.method), colLabels=list(columns), loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(7)
    for j, c in enumerate(columns):
        for i, m in enumerate(tab.method):
            if win.get(c) == m:
                t[i + 1, j].set_facecolor("#cde8c8")
                t[i + 1, j].get_text().set_fontweight("bold")
    ax.set_title(title, fontsize=9)
    return fig


def distinct_scenes(cases: Sequence, n: int = 4) -> list[int]:
    """Indices of up to n cases from different scenes, cycling through the degradations."""
    seen, out = set(), []
    degs = list(dict.fromkeys(c.meta["degradation"] for c in cases))
    for i, c in enumerate(cases):
        if c.meta["seed"] not in seen and c.meta["degradation"] == degs[len(out) % len(degs)]:
            seen.add(c.meta["seed"])
            out.append(i)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------------
# evaluating a set of cases (the eval set, or a user's case folder): methods, table, claims, files
# ------------------------------------------------------------------------------------------------
# benchmark v2: generative failures, every draft below the VAE ceiling; defaults chosen on val


@torch.no_grad()
def focus_ceiling(bb, target: torch.Tensor, mask: torch.Tensor, margin: float = 16) -> float:
    """Region PSNR of the target through Focus-and-Refine's VAE round trip: the best a latent focus refiner
    can reach."""
    area = bb.preset.resolution**2
    c, _, box = F_.focus_crop(target, mask, area, bb.multiple, margin)
    back = F_.paste_back(target, bb.roundtrip(c[None])[0].cpu(), box, F_.seam_mask(F_.crop(mask, box)))
    return Mt.region_psnr(back, target, mask)


BENCHMARK_SETS = ("scene", "object", "shift")  # v2's planar scenes; v3: an object on its own, held-out styles


def benchmark_case(kind: str, seed: int, split: str, size: int, failure: str, **kw):
    """One case of a benchmark set: scene (data.make_triplet: the scene in another view, labkit's styles), object
    (objects.object_case: a product shot as the reference; odd seeds curved) or shift (objects.shift_case: the scene
    setting in held-out appearance families)."""
    if kind == "scene":
        return make_triplet(seed, split, size, 1, failure=failure, **kw)
    if kind == "object":
        return O.object_case(seed, split, size, failure, curved=seed % 2 == 1)
    if kind == "shift":
        return O.shift_case(seed, split, size, failure, **kw)
    raise ValueError(f"unknown benchmark set {kind!r}; choose from {BENCHMARK_SETS}")


def benchmark_cases(
    bb,
    *,
    n_per_kind: int = 8,
    kinds: Sequence[str] = D.BENCHMARK_KINDS,
    size: int = 128,
    split: str = "test",
    seed: int = 0,
    view_strength: float = 0.4,
    room: float = 0.5,
    max_tries: int = 20,
    ref_deform: float = 0.0,
    which: str = "scene",
) -> list:
    """Benchmark v2/v3: n cases per kind of generative failure of one set (`which`, benchmark_case), each kept only
    if its draft lies at least `room` dB below the VAE-through-focus ceiling (else the next seed is drawn); meta
    records the ceiling and the set. Scene seeds follow the one per-case recipe (util.case_seed). ref_deform > 0
    (scene): the reference's view is also non-planar (data.make_triplet), the same scenes and failures otherwise."""
    kw = dict(view_strength=view_strength) | (dict(ref_deform=ref_deform) if which == "scene" else {})
    out = []
    for kind in kinds:
        got, i = 0, 0
        while got < n_per_kind:
            if i >= n_per_kind * max_tries:
                raise RuntimeError(f"only {got} {kind!r} cases below the VAE ceiling after {i} draws: lower `room`")
            t = benchmark_case(which, case_seed(seed, i), split, size, kind, **({} if which == "object" else kw))
            i += 1
            ceil = focus_ceiling(bb, t.target, t.mask)
            draft_psnr = Mt.region_psnr(t.draft, t.target, t.mask)
            if draft_psnr < ceil - room:
                t.meta.update(ceiling=ceil, draft_psnr=draft_psnr, set=which)
                out.append(t)
                got += 1
    return out


def runners_for(
    methods: Sequence[str],
    adapters: dict,
    steps: int | None,
    seed: int,
    preset: str,
    device: str = "cpu",
    *,
    paste_true_box: bool = False,
    prompt: str | None = None,
    input_label: str = "input",
    pastes: bool = False,
    defaults: dict | None = None,
) -> dict[str, Callable]:
    """name -> runner (case -> (output, info)): the input, (with known boxes) the naive paste, (pastes=True) the
    M*-box and registered pastes, and every model (frozen editor / adapters) through every refine method (full |
    focus | align | align_box), named "<model>/<method>", with `defaults` (e.g. blend) for the model calls. A
    case's own prompt wins."""

    def model(adapter, method):
        return lambda c: I.refine_tensor(
            c.draft,
            c.mask,
            getattr(c, "references", None) or c.reference,
            method=method,
            adapter=adapter,
            steps=steps,
            seed=seed,
            preset=preset,
            device=device,
            prompt=getattr(c, "prompt", None) or prompt,
            **(defaults or {}),
        )

    out = {input_label: lambda c: I.refine_tensor(c.draft, c.mask, method="input")}
    if paste_true_box:
        out["paste (true ref box)"] = lambda c: I.refine_tensor(
            c.draft, c.mask, c.reference, method="paste", reference_box=c.ref_bbox
        )
    if pastes:  # the no-model pastes a refiner must beat: the M* box, and the registered warp
        out["paste (M* box)"] = lambda c: I.refine_tensor(
            c.draft, c.mask, c.reference, method="paste", preset=preset, seed=seed, device=device
        )
        out["paste (registered)"] = lambda c: I.refine_tensor(
            c.draft, c.mask, c.reference, method="paste_warp", preset=preset, seed=seed, device=device
        )
    for name, folder in adapters.items():
        for m in methods:
            out[f"{name}/{m}"] = model(folder, m)
    return out


def pair_claim(
    df: pd.DataFrame, a: str, b: str, paper: str, col: str = "region_psnr", seed: int = 0, name: str = ""
) -> dict:
    """A claim 'a beats b' from the paired bootstrap over the same cases (scenes resampled), judged against the
    paper's effect for `name` (results.PAPER_EFFECTS) or the smallest effect of interest."""
    p = paired(df, a, b, col, seed)
    return claim(
        p["value"],
        p["baseline"],
        f"{col} (dB)" if "psnr" in col else col,
        paper,
        diffs=p["diffs"],
        groups=p["groups"],
        seed=seed,
        note=f"{a} vs {b}: paired over {p['n_scenes']} scenes, {p['n']} cases",
        **paper_effect(name),
    )


def evaluate_cases(
    cases: Sequence,
    out_dir: str | os.PathLike,
    preset: str = "mini",
    methods: Sequence[str] = ("full", "focus"),
    adapters: dict | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    *,
    progress: bool = True,
    params: dict | None = None,
    run_settings: dict | None = None,
) -> dict:
    """Every method on every case -> out_dir/{per_case.csv, table.csv, table.html, table.png, qualitative.png,
    results.json} (claims: best model vs the input, focus vs full, background exactness), written at once.
    Under `accelerate launch` the cases are split across the processes and rank 0 merges and writes (the
    others return {})."""
    from . import viz  # pulls matplotlib: imported where used

    require_targets(cases, "scores")  # before any work
    adapters = {"frozen": None, **(adapters or {})}
    runners = runners_for(methods, adapters, steps, seed, preset, device)
    shown = distinct_scenes(cases, 4)
    got = run_sharded(
        cases, runners, lambda c: c.draft, progress=progress, keep=shown
    )  # N processes under accelerate launch
    if got is None:
        return {}  # not the main process: rank 0 merges and writes
    df, samples = got
    columns = [c for c in COLUMNS if c in df and not df[c].isna().all()]
    tab = table(df, "method", columns, seed=seed)
    model_rows = tab[tab.method != "input"].set_index("method").region_psnr
    best_model = model_rows.idxmax()
    claims = dict(
        best_model_beats_input=pair_claim(
            df, best_model, "input", "all papers (a refiner should beat its input)", seed=seed
        )
    )
    for name in adapters:
        if f"{name}/focus" in runners and f"{name}/full" in runners and name == best_model.split("/")[0]:
            claims["focus_beats_full"] = pair_claim(
                df,
                f"{name}/focus",
                f"{name}/full",
                "RefineAnything (Focus-and-Refine vs whole image)",
                seed=seed,
                name="focus_beats_full",
            )
    focus = df[df.method.str.endswith(("/focus", "/align"))]
    if len(focus):
        worst = float(focus.bg_box_maxabs.max())
        claims["background_exact"] = claim(
            worst,
            0.0,
            "max |output - input| outside the paste box",
            "RefineAnything (Focus-and-Refine paste-back)",
            holds=worst == 0.0,
            note=f"bit-exact check over {len(focus)} focus/align outputs",
        )
    with atomic_dir(out_dir) as tmp:
        if run_settings is not None:  # the command line's settings: the same ones resume, others are refused
            write_json(run_settings, tmp / "run.json")
        df.to_csv(tmp / "per_case.csv", index=False)
        tab.to_csv(tmp / "table.csv", index=False)
        render(tab, columns, {}, str(tmp / "table.html"), f"{len(cases)} cases, preset {preset}")
        viz.save(table_figure(tab, columns, f"mean over {len(cases)} cases (best per column shaded)"), "table", tmp)
        show = list(runners)[:6]
        rows = [[cases[i].reference] + [samples[m][j] for m in show] + [cases[i].target] for j, i in enumerate(shown)]
        viz.save(
            viz.grid(
                rows, ["reference", *show, "target"], [cases[i].meta.get("source", str(i)) for i in shown], size=1.5
            ),
            "qualitative",
            tmp,
            dict(methods=show, cases=[cases[i].meta for i in shown]),
        )
        write_results(
            tmp,
            preset,
            dict(
                params or {},
                methods=list(methods),
                adapters={k: str(v) for k, v in adapters.items()},
                steps=steps,
                seed=seed,
            ),
            claims,
            n_cases=len(cases),
            best=best(tab, columns),
            table=tab.set_index("method")[columns].to_dict(),
        )
    return json.loads((Path(out_dir) / "results.json").read_text())


def parse_args(argv: list[str] | None = None):
    """The evaluate command line (usage errors exit 2 before any work)."""
    ap = argparse.ArgumentParser(
        prog="labkit evaluate",
        description="Notebook 05's tables on a case folder (metadata.jsonl): "
        "every method on every case with a target, region/background metrics, bootstrap CIs, claims.",
        epilog="example: labkit evaluate --data cases/ --out runs/eval --methods focus align",
    )
    ap.add_argument("--data", required=True, help="a case folder with metadata.jsonl; every scored case needs a target")
    ap.add_argument(
        "--out",
        required=True,
        help="output folder (per_case.csv, table.csv/html/png, qualitative.png, results.json, "
        "run.json); a finished one with the same settings is kept, other settings refused",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="start over in --out (only a folder labkit wrote: one with its run.json)"
    )
    ap.add_argument(
        "--split", default=None, choices=["train", "val", "test"], help="only this split (default: every case)"
    )
    ap.add_argument("--preset", default="mini")
    ap.add_argument(
        "--methods",
        "--pipelines",
        dest="methods",
        nargs="+",
        default=["full", "focus"],
        choices=["full", "focus", "align", "align_box"],
        help="labkit.refine's methods each model is run with",
    )
    ap.add_argument(
        "--adapters", nargs="*", default=[], help="adapter folders or committed names, besides the frozen editor"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)

    try:
        check_preset(a.preset)
    except ValueError as e:
        ap.error(str(e))
    if a.steps is not None and a.steps < 1:
        ap.error(f"--steps must be >= 1, got {a.steps}")
    return a


def main(argv: list[str] | None = None) -> int:
    """`labkit evaluate --data DIR --out OUT ...`: 0 done, 2 usage or bad input, 1 a failed run."""
    a = parse_args(argv)

    def body():
        from accelerate.utils import broadcast_object_list

        state = processes()  # N processes under accelerate launch: rank 0 checks the folder, all evaluate a shard
        settings = dict(
            data=str(Path(a.data).resolve()),
            split=a.split,
            preset=a.preset,
            methods=a.methods,
            adapters=a.adapters,
            steps=a.steps,
            seed=a.seed,
        )
        resumed = [claim_out_dir(a.out, settings, a.fresh, inputs=[a.data]) if state.is_main_process else None]
        resumed = broadcast_object_list(resumed)[0] if state.num_processes > 1 else resumed[0]
        if resumed and (Path(a.out) / "results.json").exists():
            print(f"{a.out} already holds this evaluation (same settings); pass --fresh to run it again")
            res = json.loads((Path(a.out) / "results.json").read_text())
        else:
            cases = load_cases(a.data, a.split, preset=a.preset)  # files, sizes and prompts checked before any work
            res = evaluate_cases(
                cases,
                a.out,
                a.preset,
                a.methods,
                {Path(x).name: x for x in a.adapters},
                a.steps,
                a.seed,
                a.device,
                params=dict(data=str(a.data), split=a.split),
                run_settings=settings,
            )
        if not state.is_main_process:
            return
        for k, c in res["claims"].items():
            print(
                f"{k}: {c['value']:.3f} vs {c['baseline']:.3f} {c['unit']} -> {c['verdict']}"
                + (f" (CI {c['ci'][0]:+.3f} .. {c['ci'][1]:+.3f}, MDE {c['mde']:.3f})" if "ci" in c else "")
            )
        print(f"wrote {a.out}" + (f" ({state.num_processes} processes)" if state.num_processes > 1 else ""))

    return run_cli("labkit evaluate", body, kept=f"nothing was written to {a.out} (it is written at once)")


if __name__ == "__main__":
    sys.exit(main())
