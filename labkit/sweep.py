"""Run notebooks headlessly with papermill: `make figures` (every notebook -> figures/<stem>/), and
parameter sweeps whose points collect into one tidy table.

    labkit sweep figures --preset mini [--only 03_vae_crop_vs_full]
    labkit sweep grid NOTEBOOK --param lr=1e-3,3e-3 --param seed=0,1 [--timeout 3600]
    labkit sweep grid NOTEBOOK --param seed=0,1,2 --executor slurm --partition gpu --gpus 1 --time 120 --mem 64

A notebook's outputs are written into a temporary folder and swapped into place when it finishes, so a kill
leaves the old figures or the new ones, never a mix. In a grid every point runs in its own process with a
timeout; a failed point becomes a row with its error and log path, the others still run, the table is
rewritten (atomically) after every point, a rerun skips the points already done, and the command exits
non-zero if any point failed. `--executor slurm` submits the points that are not done as one Slurm job array
through submitit (partition, GPUs, time and memory from flags or a YAML file); the table is collected the
same way. A YAML `cluster: local` runs that path on this machine with submitit's local executor (the tests).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import yaml
from traitlets.config import Config  # jupyter's config system (with papermill, a dependency): the kernel's transport

from .presets import check_preset
from .util import FAILED, REPO, TRACKERS, atomic_dir, atomic_save, run_cli, write_json

NOTEBOOKS = REPO / "notebooks"
FIGURES = REPO / "figures"
EXECUTED = REPO / ".cache" / "executed"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The ordered research notebooks (names starting with a digit), optionally filtered by stem."""
    nbs = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    if only:
        nbs = [p for p in nbs if any(p.stem == o or p.stem.startswith(o) for o in only)]
        if not nbs:
            raise ValueError(
                f"no notebook matches {only}; have {[p.stem for p in sorted(NOTEBOOKS.glob('[0-9]*.ipynb'))]}"
            )
    return nbs


def kernel_config(sockets: str) -> Config:
    """The kernel's channels as IPC sockets in the folder `sockets` (absolute, the kernel's cwd does not matter): two
    kernels started at once (make figures' jobs, the test workers) cannot race for one TCP port ("Address already in
    use", "Kernel died before replying to kernel_info")."""
    return Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(os.path.abspath(sockets), "kernel")}})


def run_notebook(path: str | os.PathLike, out_dir: str | os.PathLike, kernel: str = "python3", **params) -> dict:
    """Execute one notebook with papermill (parameters injected) into a temporary folder that replaces out_dir
    when it succeeds; return the results.json it wrote."""
    import papermill as pm  # optional: imported where used

    path, out_dir = Path(path), Path(out_dir)
    EXECUTED.mkdir(parents=True, exist_ok=True)
    env = {
        "PAPERMILL_EXECUTION": "1",
        "MPLBACKEND": os.environ.get("MPLBACKEND", "module://matplotlib_inline.backend_inline"),
    }
    os.environ.update(env)
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="labkit-kernel-") as sockets:
        pm.execute_notebook(
            str(path),
            str(EXECUTED / f"{out_dir.parent.name}__{out_dir.name}__{path.name}"),  # parent: runs never share one
            parameters=dict(out_dir=str(tmp), **params),
            kernel_name=kernel,
            cwd=str(path.parent),
            progress_bar=False,
            config=kernel_config(sockets),
        )
        if not (tmp / "results.json").exists():
            raise RuntimeError(f"{path.name} ran but wrote no results.json")
    return json.loads((out_dir / "results.json").read_text())


READS = {"06_reward_finetune": ("04_train_freqmole",)}  # a notebook runs after those whose figures it reads
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # figures' kernels: the same sums on every machine


def _run_pinned(nb: Path, preset: str) -> float:
    """One figures notebook in this (worker) process, its kernel on one thread: the seconds it took."""
    os.environ.update(THREADS)  # the kernel papermill starts inherits it
    t0 = time.time()
    run_notebook(nb, FIGURES / nb.stem, preset=preset)
    return time.time() - t0


def figures(preset: str = "mini", only: list[str] | None = None, jobs: int = 2) -> Path:
    """Run every notebook on `preset` into figures/<stem>/, `jobs` at a time (each kernel on one thread, so the
    numbers do not depend on the machine or on jobs; a notebook waits for those it READS, the longest last run
    starts first), record the seconds in figures/timings.json and write figures/SUMMARY.md of all claims."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: run at least one notebook at a time (--jobs 1)")
    stamp = FIGURES / "timings.json"
    last = json.loads(stamp.read_text()) if stamp.exists() else {}
    todo = sorted(notebooks(only), key=lambda p: -last.get(p.stem, 0))
    done, running, seconds, t0 = set(), {}, dict(last), time.time()
    with ProcessPoolExecutor(jobs) as pool:
        while todo or running:
            pending = {p.stem for p in todo} | set(running.values())
            ready = [p for p in todo if not pending.intersection(READS.get(p.stem, ()))]
            for nb in ready[: jobs - len(running)]:
                print(f"[figures] {nb.stem} on {preset} ...", flush=True)
                running[pool.submit(_run_pinned, nb, preset)] = nb.stem
                todo.remove(nb)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                sec, stem = f.result(), running.pop(f)  # a failed notebook raises here: its old figures stay
                print(f"[figures] {stem}: {sec:.0f} s", flush=True)
                done.add(stem)
                seconds[stem] = round(sec)
    write_json(dict(sorted(seconds.items())), stamp)
    print(f"[figures] {len(done)} notebooks in {time.time() - t0:.0f} s ({jobs} at a time)", flush=True)
    write_summary()
    return FIGURES


def _fmt(v) -> str:
    """A number to 4 significant digits; anything else as it is."""
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _claim_cells(c: dict) -> list[str]:
    """One claim's SUMMARY.md cells: value, baseline, verdict, diff [CI], MDE, judged against, to settle, unit."""
    v = c.get("verdict", "holds" if c.get("holds") else "refuted")
    ci = f"{c['diff']:+.3g} [{c['ci'][0]:+.3g}, {c['ci'][1]:+.3g}]" if "ci" in c and "diff" in c else "exact"
    against = f"{_fmt(c['paper_effect'])} ({c.get('paper_effect_source', '')})" if "paper_effect" in c else ""
    b = c.get("budget") or {}
    settle = ", ".join(f"{b[k]} {k}" for k in ("cases", "seeds") if b.get(k)) if b else ""
    shown = "**" + v + "**" if v != "holds" else v
    mde = _fmt(c["mde"]) if "mde" in c else ""
    return [_fmt(c.get("value")), _fmt(c.get("baseline")), shown, ci, mde, against, settle, c.get("unit", "")]


def write_summary() -> Path:
    """figures/SUMMARY.md: every notebook's claims with their verdict, the CI of the difference, the smallest
    detectable effect, the effect judged against and, for each inconclusive claim, the budget that would settle it;
    then the committed sweep points (other seeds, longer runs) with theirs."""
    head = "| value | baseline | verdict | diff [95% CI] | MDE | judged against | to settle | unit |"
    lines = [
        "# What reproduces on this backbone",
        "",
        "Generated by `make figures` from each `figures/<notebook>/results.json` (computed, never typed in by",
        "`labkit.results.claim`). **holds**: the 95% CI of the paired difference lies above zero (or the stated",
        "threshold); **refuted**: it lies below zero or excludes the effect it is judged against (the paper's, or a",
        "stated smallest effect of interest); **inconclusive**: it spans both - the budget column says what would",
        "settle it (cases at these seeds, or seeds at these cases). MDE: the smallest effect this budget detects",
        "(80% power). Exact counts and bit-exact checks carry no CI.",
        "",
        "| notebook | claim " + head,
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in sorted(FIGURES.glob("*/results.json")):
        r = json.loads(res.read_text())
        for name, c in r.get("claims", {}).items():
            lines.append(f"| {res.parent.name} ({r.get('preset')}) | {name} | " + " | ".join(_claim_cells(c)) + " |")
    points = sorted((FIGURES / "sweep").glob("*/*/results.json"))
    if points:
        lines += [
            "",
            "## Committed sweep points (`labkit sweep grid`: other seeds, longer runs)",
            "",
            "Each point is the notebook run with the parameters shown (the rest at its defaults) and committed under",
            "`figures/sweep/<notebook>/<point>/`; a notebook that pools seeds reads its points (04).",
            "",
            "| notebook | point | claim " + head,
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for res in points:
            r = json.loads(res.read_text())
            for name, c in r.get("claims", {}).items():
                cells = [res.parent.parent.name, res.parent.name, name, *_claim_cells(c)]
                lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    return atomic_save(lambda p: Path(p).write_text(text), FIGURES / "SUMMARY.md")


def committed_points(stem: str, params: dict, vary: tuple[str, ...] = ("seed",)) -> list[Path]:
    """The committed sweep points of notebook `stem` (figures/sweep/<stem>/<point>/results.json) run with these
    params except those in `vary` (e.g. the other seeds of the same settings), in name order: what a notebook pools."""
    same = lambda q: all(q.get(k) == v for k, v in params.items() if k not in vary)  # noqa: E731
    out = []
    for res in sorted((FIGURES / "sweep" / stem).glob("*/results.json")):
        q = json.loads(res.read_text()).get("params", {})
        if same(q) and any(q.get(k) != params.get(k) for k in vary):
            out.append(res.parent)
    return out


def run_point(nb: Path, out_dir: Path, preset: str, params: dict, timeout: float | None) -> dict:
    """One notebook run in its own process group with a timeout: dict(status, error, log, seconds, claims)."""
    log = out_dir.with_name(out_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "labkit.sweep",
        "run",
        str(nb),
        str(out_dir),
        "--preset",
        preset,
        "--params-json",
        json.dumps(params),
    ]
    t0, status, error = time.time(), "ok", ""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the kernel too: it is in the same process group
            proc.wait()
            rc, status, error = -9, "timeout", f"timed out after {timeout:g} s"
    if rc and status == "ok":
        status = "failed"
        errs = [
            ln.strip()
            for ln in log.read_text(errors="replace").splitlines()
            if re.match(r"^\s*[\w.]*(Error|Exception)\b", ln)
        ]
        error = errs[-1] if errs else f"exit status {rc}"
    res = out_dir / "results.json"
    claims = json.loads(res.read_text())["claims"] if status == "ok" and res.exists() else {}
    return dict(
        status=status,
        error=error,
        log=str(log.relative_to(REPO) if log.is_relative_to(REPO) else log),
        seconds=round(time.time() - t0, 1),
        claims=claims,
    )


def grid(
    notebook: str,
    params: dict[str, list],
    preset: str = "mini",
    out: Path | None = None,
    extra: dict | None = None,
    timeout: float | None = 3600,
    executor: str = "local",
    cluster: dict | None = None,
) -> Path:
    """Run one notebook at every point of a parameter grid (plus fixed `extra` parameters) and collect each
    point's claims (or its error and log) into one tidy CSV, rewritten after every point. Points already done
    (status ok) in an earlier table are skipped. executor: local (one process per point, here, in turn) or
    slurm (one submitit job array; `cluster`: slurm_config's keys)."""
    nb = notebooks([notebook])[0]
    out = Path(out or FIGURES / "sweep" / nb.stem)
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    if (out / "table.json").exists():
        done = {r["point"]: r for r in json.loads((out / "table.json").read_text()) if r.get("status") == "ok"}
    points = {
        "_".join(f"{k}-{v}" for k, v in pt.items()): pt
        for pt in (dict(zip(params, vs)) for vs in itertools.product(*params.values()))
    }
    rows = {tag: done[tag] for tag in points if tag in done and (out / tag / "results.json").exists()}
    todo = {tag: {**(extra or {}), **pt} for tag, pt in points.items() if tag not in rows}
    if executor == "local":
        results = ((tag, run_point(nb, out / tag, preset, p, timeout)) for tag, p in todo.items())
    elif executor == "slurm":
        results = submit_points(nb, out, preset, todo, timeout, cluster or {})
    else:
        raise ValueError(f"unknown executor {executor!r}: local or slurm")
    write_table(out, points, rows)
    for tag, r in results:
        rows[tag] = {
            "point": tag,
            **points[tag],
            "status": r["status"],
            "error": r["error"],
            "log": r["log"],
            "seconds": r["seconds"],
            **{f"{k}": c["value"] for k, c in r["claims"].items()},
            **{f"{k}_verdict": c.get("verdict") for k, c in r["claims"].items()},
        }
        print(f"[sweep] {tag}: {r['status']} {r['error']}", flush=True)
        write_table(out, points, rows)
    return out / "table.csv"


def write_table(out: Path, points: dict, rows: dict) -> None:
    """table.csv + table.json of the rows so far, in grid order (atomically)."""
    import pandas as pd  # heavy: imported where used

    ordered = [rows[t] for t in points if t in rows]
    atomic_save(lambda p: pd.DataFrame(ordered).to_csv(p, index=False), out / "table.csv")
    write_json(ordered, out / "table.json")


# ------------------------------------------------------------------------------------------------ Slurm (submitit)
SLURM_KEYS = dict(
    partition="slurm_partition",
    gpus="gpus_per_node",
    time="timeout_min",
    mem="mem_gb",
    cpus="cpus_per_task",
    array_parallelism="slurm_array_parallelism",
    account="slurm_account",
    qos="slurm_qos",
)


def slurm_parameters(cluster: dict, timeout: float | None) -> tuple[str, dict]:
    """(submitit cluster name, update_parameters kwargs) from slurm_config keys; submitit's own names
    (slurm_*, timeout_min, ...) pass through unchanged."""
    cfg = dict(cluster)
    name = cfg.pop("cluster", "slurm")
    kw = {SLURM_KEYS.get(k, k): v for k, v in cfg.items() if v is not None}
    kw.setdefault("timeout_min", max(1, math.ceil((timeout or 3600) / 60)))
    return name, kw


def point_job(nb: str, out_dir: str, preset: str, params: dict) -> dict:
    """What one array job runs: the notebook into its folder; returns its claims and seconds."""
    t0 = time.time()
    res = run_notebook(nb, out_dir, preset=preset, **params)
    return dict(claims=res["claims"], seconds=round(time.time() - t0, 1))


def submit_points(nb: Path, out: Path, preset: str, todo: dict[str, dict], timeout: float | None, cluster: dict):
    """Submit the points as one job array (submitit's AutoExecutor.map_array); yield (tag, result) as jobs finish."""
    import submitit  # optional: imported where used

    if not todo:
        return
    name, kw = slurm_parameters(cluster, timeout)
    ex = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster=name)
    ex.update_parameters(name=f"labkit-{nb.stem}", **kw)
    tags = list(todo)
    jobs = ex.map_array(
        point_job, [str(nb)] * len(tags), [str(out / t) for t in tags], [preset] * len(tags), [todo[t] for t in tags]
    )
    print(
        f"[sweep] {len(jobs)} points submitted to {ex.cluster} (job array {jobs[0].job_id.split('_')[0]}); "
        f"logs in {out / 'submitit'}",
        flush=True,
    )
    tag_of = {j.job_id: t for j, t in zip(jobs, tags)}
    for job in submitit.helpers.as_completed(jobs):
        log = str(job.paths.stdout)
        try:
            r = job.result()
            yield tag_of[job.job_id], dict(status="ok", error="", log=log, seconds=r["seconds"], claims=r["claims"])
        except Exception as e:  # noqa: BLE001 - a failed point is a row with its error, the others still count
            lines = [ln.strip() for ln in str(e).splitlines() if re.match(r"^\s*[\w.]*(Error|Exception)\b", ln)]
            status = "timeout" if "timed out" in str(e).lower() or "TIMEOUT" in str(e) else "failed"
            yield (
                tag_of[job.job_id],
                dict(
                    status=status,
                    error=lines[-1] if lines else str(e).splitlines()[0][:300],
                    log=log,
                    seconds=float("nan"),
                    claims={},
                ),
            )


def slurm_config(path: str | None, flags: dict) -> dict:
    """The cluster settings: a YAML file's keys (partition, gpus, time, mem, cpus, array_parallelism, cluster,
    or submitit's own names), overridden by the flags that were given."""
    cfg = {}
    if path:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: a YAML mapping of Slurm settings (partition: gpu, gpus: 1, time: 120, mem: 64)")
    return cfg | {k: v for k, v in flags.items() if v is not None}


def notebook_parameters(path: str | os.PathLike) -> set[str]:
    """The names a notebook's `parameters` cell assigns (what papermill can set)."""
    cells = json.loads(Path(path).read_text())["cells"]
    src = "".join(next(c["source"] for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])))
    return {
        t.id
        for node in ast.parse(src).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def parse_grid(items: list[str], nb: Path) -> dict[str, list]:
    """--param name=v1,v2 ... -> {name: [values]}: every name one of the notebook's parameters, every value given
    (a typo such as sed=0,1 would run every point with the default and report them all "ok")."""
    known, params = notebook_parameters(nb), {}
    for item in items:
        name, eq, values = item.partition("=")
        if not eq or not name.strip() or not values or any(v == "" for v in values.split(",")):
            raise ValueError(f"--param {item!r}: write name=v1,v2,... (e.g. --param seed=0,1,2)")
        if name not in known:
            raise ValueError(f"--param {name}: {nb.stem} has no parameter {name!r}; its parameters: {sorted(known)}")
        params[name] = [_parse_value(v) for v in values.split(",")]
    return params


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv: list[str] | None = None) -> int:
    """`labkit sweep {figures,grid,run} ...`: 0 done, 2 usage or bad input, 1 a failed point or notebook."""
    ap = argparse.ArgumentParser(
        prog="labkit sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples: labkit sweep figures --only 03   |   "
        "labkit sweep grid 03_vae_crop_vs_full --preset tiny --param seed=0,1,2",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser(
        "figures",
        help="run every notebook into figures/<stem>/",
        description="example: labkit sweep figures --preset mini --only 03_vae_crop_vs_full",
    )
    f.add_argument("--preset", default="mini")
    f.add_argument("--only", nargs="*", default=None, help="notebook stems (or prefixes) to run")
    f.add_argument("--jobs", type=int, default=2, help="notebooks at a time (each kernel on one thread)")
    g = sub.add_parser(
        "grid",
        help="papermill sweep of one notebook over a parameter grid",
        description="example: labkit sweep grid 03_vae_crop_vs_full --preset tiny --param seed=0,1,2 --timeout 600",
    )
    g.add_argument("notebook")
    g.add_argument("--preset", default="mini")
    g.add_argument("--param", action="append", default=[], help="name=v1,v2,... (repeatable)")
    g.add_argument(
        "--timeout", type=float, default=3600, help="seconds per point before it is killed and marked failed"
    )
    g.add_argument("--out", default=None, help="folder of the sweep (default figures/sweep/<notebook>)")
    g.add_argument(
        "--report-to",
        default=None,
        choices=TRACKERS,
        help="an experiment tracker for every point's training runs (notebooks with a report_to parameter: 04, 06)",
    )
    g.add_argument(
        "--executor",
        choices=["local", "slurm"],
        default="local",
        help="local: one process per point here; slurm: one submitit job array",
    )
    g.add_argument(
        "--slurm-config",
        default=None,
        help="YAML of Slurm settings (partition, gpus, time, mem, cpus, array_parallelism)",
    )
    g.add_argument("--partition", default=None)
    g.add_argument("--gpus", type=int, default=None, help="GPUs per job")
    g.add_argument("--time", type=int, default=None, help="minutes per job (default: --timeout)")
    g.add_argument("--mem", type=float, default=None, help="GB of memory per job")
    g.add_argument("--cpus", type=int, default=None, help="CPUs per job")
    g.add_argument("--array-parallelism", type=int, default=None, help="at most this many jobs of the array at once")
    r = sub.add_parser(
        "run",
        help="run one notebook into a folder (what each grid point runs in its own process)",
        description="example: labkit sweep run 03_vae_crop_vs_full out/ --preset tiny --params-json '{\"seed\": 1}'",
    )
    r.add_argument("notebook")
    r.add_argument("out_dir")
    r.add_argument("--preset", default="mini")
    r.add_argument("--params-json", default="{}")
    a = ap.parse_args(argv)
    try:
        check_preset(a.preset)
    except ValueError as e:
        ap.error(str(e))

    if a.cmd == "figures" and a.only == []:
        ap.error("--only needs notebook names (e.g. --only 03_vae_crop_vs_full); leave it out to run every notebook")

    def body():
        if a.cmd == "figures":
            figures(a.preset, a.only, a.jobs)
        elif a.cmd == "run":
            run_notebook(a.notebook, a.out_dir, preset=a.preset, **json.loads(a.params_json))
        else:
            import pandas as pd

            nb = notebooks([a.notebook])[0]
            params = parse_grid(a.param, nb)
            extra = {}
            if a.report_to is not None:
                if "report_to" not in notebook_parameters(nb):
                    raise ValueError(f"--report-to: {nb.stem} trains nothing (it has no report_to parameter)")
                extra["report_to"] = a.report_to
            cluster = (
                slurm_config(
                    a.slurm_config,
                    dict(
                        partition=a.partition,
                        gpus=a.gpus,
                        time=a.time,
                        mem=a.mem,
                        cpus=a.cpus,
                        array_parallelism=a.array_parallelism,
                    ),
                )
                if a.executor == "slurm"
                else None
            )
            path = grid(
                a.notebook,
                params,
                a.preset,
                out=Path(a.out) if a.out else None,
                extra=extra,
                timeout=a.timeout,
                executor=a.executor,
                cluster=cluster,
            )
            table = pd.read_csv(path)
            print(path)
            failed = table[table.status != "ok"]
            if len(failed):
                print(
                    f"labkit sweep: {len(failed)} of {len(table)} points failed: "
                    + "; ".join(f"{r.point}: {r.error} (log {r.log})" for r in failed.itertuples()),
                    file=sys.stderr,
                )
                return FAILED

    return run_cli(
        "labkit sweep", body, kept="finished notebooks and grid points are kept; the same command skips them"
    )


if __name__ == "__main__":
    sys.exit(main())
