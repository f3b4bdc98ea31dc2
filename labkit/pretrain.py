"""Pretraining the mini editor DiT as a Kontext-style general editor (flow matching, CPU).

Tasks (one per batch, so sequence lengths match): reconstruct the context; upscale (the context is the
target bicubic-downscaled x2 or x4 and bicubic-upsampled back, so its tokens sit on the target's grid, as
the refinement drafts do); denoise; restore a degraded region of the context from a reference that shows
the same content in another view (curriculum: the reference starts aligned and the view change grows);
refine (instruction "refine"): the inputs exactly as `labkit.refine` builds them at the focus scale - the
draft's Focus-and-Refine crop with one generative failure in the region, and the reference warped into the
draft's frame (small residual misalignment, a photometric change) cropped by the same box. Examples of the
refine task are bucketed by the focus crop's snapped shape (one shape per batch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import align as A
from . import data as D
from . import focus as F_
from . import images as IM
from . import objects as O
from . import presets as P
from .loop import LoopConfig, Step, run_loop
from .losses import flow_matching_loss, sample_t
from .metrics import bootstrap_ci, case_metrics
from .sampling import sample
from .util import atomic_save

TASKS = ("reconstruct", "upscale", "denoise", "restore", "refine")
EVAL_TASKS = ("reconstruct", "upscale_x2", "upscale_x4", "denoise", "restore")  # upscale scored per factor
REFINE_DAMAGE = D.FAILURES  # the refine task trains on every kind of generative failure


@dataclass
class EditorConfig:
    """The mini editor recipe."""

    size: int = 128  # target side (64 tokens)
    batch: int = 8
    # reconstruct upscale denoise restore refine; reconstruct reaches the VAE ceiling early
    task_probs: tuple[float, ...] = (0.05, 0.15, 0.05, 0.2, 0.55)
    # restore: mostly strong artifacts the VAE keeps (so the reference is needed), some of the benchmark's mild ones
    restore_degradations: tuple[str, ...] = ("smear", "occlude", "blur", "color", "noise", "elastic", "glyph")
    restore_probs: tuple[float, ...] = (0.3, 0.3, 0.08, 0.08, 0.08, 0.08, 0.08)
    curriculum_frac: float = 0.5  # fraction of steps over which the reference's view change ramps 0 -> 1
    upscale: tuple[int, ...] = (2, 4)  # factors drawn per example; x4 is RefGC-SR2's setting
    noise: tuple[float, float] = (0.05, 0.15)
    # refine: full-image sides drawn per example, region area, residual misalignment of the aligned reference
    refine_sides: tuple[int, ...] = (128, 192, 256)
    refine_area: tuple[float, float] = (0.02, 0.2)
    misalign: float = (
        0.04  # max view strength of the residual warp (0.04: <1 deg, <1% shift: what a registration leaves); 30% exact
    )
    refine_kind_probs: tuple[float, ...] | None = (
        None  # per kind of REFINE_DAMAGE (None: uniform); hard kinds up-weighted
    )
    region: str = (
        "none"  # region encoding: none | context (the mask as an image context) | draw (outlined on the draft)
    )
    text_frac: float = 0.5  # refine targets: rendered text and logos this often, photos otherwise
    # refine: this fraction gives the editor the registered paste as its draft, as refine(paste_first=True) does
    # (the aligned reference, its light matched to the draft's outside the region, soft-pasted into the region)
    paste_first: float = 0.0
    deform: float = 0.0  # refine: half the examples' aligned reference also bent non-rigidly by up to this many px
    # refine, robustness across styles and views (labkit.objects): a start already right comes back unchanged; a
    # reference not in the draft's frame (Refine-by-Align's refinement mode: another scale and pose, cropped around
    # the region's counterpart); an object on its own as the reference (product shot, warped into the draft's frame
    # by the true mapping) in the seen appearance families - the held-out ones never reach training
    identity: float = 0.0
    unaligned: float = 0.0
    objects: float = 0.0


def registered_view(rng: np.random.Generator, img: np.ndarray, misalign: float) -> np.ndarray:
    """The target seen again after a registration: a residual warp of view strength <= misalign (none 30% of
    the time) and a photometric change (gamma, exposure, white balance), as make_triplet's reference has."""
    s = img.shape[0]
    strength = 0.0 if rng.random() < 0.3 else rng.uniform(0, misalign)
    ref = np.clip(D._warp(img, D._view_homography(rng, s, strength), s), 0, 1) if strength else img
    return D.random_light(rng, ref).astype(np.float32)


def refine_example(
    rng: np.random.Generator,
    split: str,
    cfg: EditorConfig,
    kind: str | None = None,
    work: int = 128,
    multiple: int = 16,
    margin: float = 16,
    content: str | None = None,
) -> dict:
    """One refine example built as `labkit.refine(method='focus')` builds its inputs: the draft's focus crop
    (3, h, w), its mask (1, h, w), the target crop, and the aligned reference cropped by the same box (also
    the target crop itself, `target_ref`: the perfectly aligned reference). h x w ~ work², snapped sides."""
    p = None if cfg.refine_kind_probs is None else np.asarray(cfg.refine_kind_probs) / sum(cfg.refine_kind_probs)
    kind = kind or str(rng.choice(REFINE_DAMAGE, p=p))
    size = int(rng.choice(cfg.refine_sides))
    if content is None:
        content = ("text" if rng.random() < 0.5 else "logo") if rng.random() < cfg.text_frac else "photo"
    mode = "objects" if cfg.objects and rng.random() < cfg.objects else "plain"  # no draw at 0: old streams kept
    if mode == "objects":  # a product shot, warped into the scene's frame by the true mapping (a perfect registration)
        case = O.object_case(int(rng.integers(2**31)), split, size, kind, curved=bool(rng.random() < 0.5))
        c, name, img, mask = "object", case.meta["kind"], IM.to_numpy(case.target), IM.to_numpy(case.mask)[..., 0]
        xy = torch.from_numpy(O.true_reference_coords(case)).float()
        g = torch.stack([(xy[..., 0] + 0.5) / size * 2 - 1, (xy[..., 1] + 0.5) / size * 2 - 1], -1).nan_to_num(2.0)
        warped, support = (
            torch.nn.functional.grid_sample(x[None], g[None], align_corners=False)[0]
            for x in (case.reference, case.ref_mask)
        )
        w = (support > 0.99).double() * (1 - F_.seam_mask(case.mask).double())  # the object, outside the region
        a, b = A._gain_offset(warped.double(), case.target.double(), w)  # its light, as the object path fits it
        ref = IM.to_numpy((a * warped + b).float().clamp(0, 1))
    else:
        srcs = D.sources(split, content)
        c, name = srcs[int(rng.integers(len(srcs)))]
        img = D.random_crop(rng, D.load_source(split, c, name), size, zoom=(0.3, 1.0))
        mask = D.random_blob(rng, size, cfg.refine_area)
    identity = bool(cfg.identity) and rng.random() < cfg.identity
    draft = img.astype(np.float32) if identity else D.damage(rng, img, mask, kind)
    kind = "identity" if identity else kind
    if mode == "plain":  # drawn after the damage, as the recipe always has (the same streams at the old settings)
        ref = registered_view(rng, img, cfg.misalign)
    if cfg.deform and rng.random() < 0.5:  # a non-rigid residual no registration removes (parallax, a bent label)
        ref = D.displace(rng, ref, size / 6, rng.uniform(0, cfg.deform))
    t_draft, t_mask, t_ref = IM.to_tensor(draft), IM.to_tensor(mask[..., None]), IM.to_tensor(ref)
    if cfg.paste_first and rng.random() < cfg.paste_first:  # as refine(paste_first=True, relight=True) builds it
        t_ref = t_ref if mode == "objects" else A.match_light(t_ref, t_draft, t_mask)  # objects: relit already
        t_draft = A.soft_paste(t_draft, t_mask, t_ref)
    c_draft, c_mask, box = F_.focus_crop(t_draft, t_mask, work * work, multiple, margin)
    hw = c_draft.shape[-2:]
    crop = lambda x: IM.resize(F_.crop(x, box), hw)  # noqa: E731
    c_ref = crop(t_ref)
    if mode == "plain" and cfg.unaligned and rng.random() < cfg.unaligned:  # another scale and pose, cropped
        view = D._view_homography(rng, size, 1.0)  # reference px -> target px
        other = D.random_light(rng, np.clip(D._warp(img, view, size), 0, 1))
        r_mask = D._warp(mask, view, size, order=1) > 0.5
        if r_mask.any():
            x0, y0, x1, y1 = IM.bbox_of(r_mask)
            gx, gy = (x1 - x0) // 2, (y1 - y0) // 2
            c_ref = IM.resize(F_.crop(IM.to_tensor(other), (max(0, x0 - gx), max(0, y0 - gy), x1 + gx, y1 + gy)), hw)
            kind = f"{kind}+unaligned"
    return dict(
        draft=c_draft,
        mask=c_mask,
        target=crop(IM.to_tensor(img)),
        reference=c_ref,
        kind=kind,
        content=c,
        source=name,
        box=box,
        size=size,
    )


@torch.no_grad()
def build_refine_bank(bb, n: int, split: str, cfg: EditorConfig, seed: int = 0) -> dict[str, dict]:
    """Pre-encoded refine examples bucketed by crop shape: {"refine@HxW": dict(target, contexts, strength)}."""
    rng = np.random.default_rng([seed, D.hash_str("refine"), D.hash_str(split)])
    buckets: dict[str, list] = {}
    for _ in range(n):
        e = refine_example(rng, split, cfg, multiple=bb.multiple)
        ctx = F_.region_contexts(e["draft"], e["mask"], [e["reference"]], cfg.region)
        h, w = e["target"].shape[-2:]
        buckets.setdefault(f"refine@{h}x{w}", []).append(
            (bb.encode(e["target"][None]).cpu(), [bb.encode(x[None]).cpu() for x in ctx])
        )
    return {
        k: dict(
            target=torch.cat([a for a, _ in v]),
            contexts=[torch.cat(z) for z in zip(*[c for _, c in v])],
            strength=torch.zeros(len(v)),
        )
        for k, v in buckets.items()
    }


def task_batch(
    task: str,
    rng: np.random.Generator,
    split: str,
    cfg: EditorConfig,
    progress: float = 1.0,
    factor: int | None = None,
    degradations: list[str] | None = None,
) -> dict:
    """Pixels for one task: target (B,3,S,S), contexts [list of (B,3,S,S)], mask (B,1,S,S) or None.

    factor fixes the upscale factor (default: one of cfg.upscale per example); degradations fixes each
    restore example's artifact (default: drawn from cfg.restore_degradations with cfg.restore_probs)."""
    b, s = cfg.batch, cfg.size
    if task == "restore":
        kinds = degradations or [str(rng.choice(cfg.restore_degradations, p=cfg.restore_probs)) for _ in range(b)]
        trips = [
            D.make_triplet(
                int(rng.integers(2**31)),
                split,
                s,
                factor=1,
                view_strength=min(1.0, progress / cfg.curriculum_frac),
                degradation=kinds[i],
                area=(0.05, 0.25),
            )
            for i in range(b)
        ]
        stack = lambda k: torch.stack([getattr(t, k) for t in trips])  # noqa: E731
        return dict(
            target=stack("target"), contexts=[stack("lowres"), stack("reference")], mask=stack("mask"), trips=trips
        )
    x = D.crop_batch(rng, split, b, s)
    if task == "reconstruct":
        ctx = x
    elif task == "upscale":  # aligned draft: a half-size context with integer ids would sit on the wrong grid
        fs = [factor] * b if factor else rng.choice(cfg.upscale, b).tolist()
        ctx = torch.cat([IM.bicubic_draft(x[i : i + 1], int(f)) for i, f in enumerate(fs)])
    elif task == "denoise":
        sig = torch.from_numpy(rng.uniform(*cfg.noise, (b, 1, 1, 1))).float()
        ctx = (x + sig * torch.from_numpy(rng.standard_normal(x.shape)).float()).clamp(0, 1)
    else:
        raise ValueError(
            f"unknown task {task!r} for task_batch; choose from {TASKS[:4]} (refine examples: refine_example)"
        )
    return dict(target=x, contexts=[ctx], mask=None)


@torch.no_grad()
def build_bank(bb, task: str, n: int, split: str, cfg: EditorConfig, seed: int = 0, chunk: int = 16) -> dict:
    """Pre-encoded latents for n examples of a task: target (n,16,h,w), contexts [..], view strength (n,).

    Encoding once and reusing keeps CPU steps about the DiT, not the data pipeline. Restore examples
    are spread over view strengths 0..1 so the curriculum can pick the ones it allows."""
    rng = np.random.default_rng([seed, D.hash_str(task), D.hash_str(split)])
    tgt, ctxs, strength = [], [], []
    for i in range(0, n, chunk):
        c = EditorConfig(**{**cfg.__dict__, "batch": min(chunk, n - i)})
        prog = (i / max(1, n - 1)) * cfg.curriculum_frac  # strengths 0..1 across the bank
        b = task_batch(task, rng, split, c, progress=prog)
        tgt.append(bb.encode(b["target"]).cpu())
        ctxs.append([bb.encode(x).cpu() for x in b["contexts"]])
        strength += [min(1.0, prog / cfg.curriculum_frac)] * c.batch
    return dict(target=torch.cat(tgt), contexts=[torch.cat(k) for k in zip(*ctxs)], strength=torch.tensor(strength))


def bank_batch(
    bank: dict, rng: np.random.Generator, batch: int, max_strength: float = 1.0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random batch from a bank, only examples whose view strength ≤ max_strength (curriculum)."""
    ok = torch.nonzero(bank["strength"] <= max_strength + 1e-6).flatten().numpy()
    idx = torch.from_numpy(rng.choice(ok, batch, replace=len(ok) < batch))
    return bank["target"][idx], [c[idx] for c in bank["contexts"]]


def save_banks(banks: dict, path: Path) -> None:
    """Editor banks as one safetensors file (no pickles), written atomically."""
    flat = {}
    for task, b in banks.items():
        flat |= {f"{task}.target": b["target"], f"{task}.strength": b["strength"]}
        flat |= {f"{task}.context.{i}": c for i, c in enumerate(b["contexts"])}
    atomic_save(lambda p: save_file({k: v.contiguous() for k, v in flat.items()}, p), path)


def load_banks(path: Path) -> dict:
    """The inverse of save_banks."""
    flat, banks = load_file(str(path)), {}
    for task in dict.fromkeys(k.split(".")[0] for k in flat):
        n = sum(k.startswith(f"{task}.context.") for k in flat)
        banks[task] = dict(
            target=flat[f"{task}.target"],
            strength=flat[f"{task}.strength"],
            contexts=[flat[f"{task}.context.{i}"] for i in range(n)],
        )
    return banks


def _refine_buckets(banks: dict) -> tuple[list[str], np.ndarray]:
    """The refine task's bucket names and their sampling probabilities (proportional to their sizes)."""
    names = sorted(k for k in banks if k.startswith("refine@"))
    n = np.array([len(banks[k]["target"]) for k in names], dtype=float)
    return names, n / n.sum()


def train_editor(bb, loop: LoopConfig, cfg: EditorConfig, bank_size: int = 1024, refine_bank: int = 2048) -> dict:
    """Flow-matching pretraining of bb.transformer (+ instruction embedding); the VAE stays frozen."""
    bb.vae.requires_grad_(False)
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[
        :10
    ]  # a changed recipe rebuilds the bank
    path = Path(loop.out_dir) / f"bank_{bank_size}_{refine_bank}_{cfg.size}_{key}.safetensors"
    active = [t for t, p in zip(TASKS, cfg.task_probs) if p > 0]  # tasks the mix draws (a probe may train one)

    def banks_for(n_per_task: int, n_refine: int, split: str, seed: int) -> dict:
        out = {
            t: build_bank(bb, t, n_per_task * (2 if t == "restore" else 1), split, cfg, seed)
            for t in active
            if t != "refine"
        }
        return out | (build_refine_bank(bb, n_refine, split, cfg, seed) if "refine" in active else {})

    if path.exists():
        banks = load_banks(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        banks = banks_for(bank_size, refine_bank, "train", loop.seed)
        save_banks(banks, path)
    val = banks_for(32, 64, "val", 500)
    buckets, bucket_p = _refine_buckets(banks)
    bb.transformer.requires_grad_(True)
    bb.text.requires_grad_(True)

    def loss_fn(s: Step):
        task = TASKS[s.rng.choice(len(TASKS), p=cfg.task_probs)]  # one task per global batch (sequence lengths match)
        bank = banks[buckets[s.rng.choice(len(buckets), p=bucket_p)]] if task == "refine" else banks[task]
        x0, ctx = bank_batch(
            bank, s.rng, cfg.batch * s.world, max_strength=min(1.0, s.step / (cfg.curriculum_frac * loop.steps))
        )
        t = sample_t(s.rng, x0.shape[0])
        eps = torch.from_numpy(s.rng.standard_normal(x0.shape)).float()
        loss = flow_matching_loss(s.model, s.shard(x0), [s.shard(c) for c in ctx], task, s.shard(t), s.shard(eps))
        return loss, {f"loss_{task}": loss.detach()}

    def eval_fn(step):
        out, refine = {}, []
        g = np.random.default_rng(0)
        for name, bank in val.items():
            x0, ctx = bank["target"], bank["contexts"]
            ts = torch.full((x0.shape[0],), 0.5)
            task = name.split("@")[0]
            loss = float(
                flow_matching_loss(bb, x0, ctx, task, ts, torch.from_numpy(g.standard_normal(x0.shape)).float())
            )
            if task == "refine":
                refine.append((loss, len(x0)))
            else:
                out[f"val_loss_{task}"] = loss
        if refine:
            out["val_loss_refine"] = sum(v * n for v, n in refine) / sum(n for _, n in refine)
            # the copy skill, sampled, on the draft as it is (paste-first drafts would make it easier): comparable
            # across recipes
            r = evaluate_refine(bb, n=16, steps=8, split="val", cfg=EditorConfig(region=cfg.region))["summary"]
            out |= {f"val_refine_{k}": v for k, v in r.items()}
        return out

    state = run_loop(
        loop, bb, loss_fn, eval_fn, run_config=dict(editor=asdict(cfg), bank_size=bank_size, refine_bank=refine_bank)
    )
    bb.requires_grad_(False)
    return state


@torch.no_grad()
def evaluate_refine(
    bb,
    *,
    n: int = 24,
    steps: int = 8,
    seed: int = 0,
    split: str = "val",
    cfg: EditorConfig | None = None,
    reference: str = "target",
    kinds: tuple[str, ...] = REFINE_DAMAGE,
    content: str | None = None,
    room: float = 1.0,
    max_tries: int = 12,
) -> dict:
    """The copy skill at the focus scale: region PSNR of the editor's focus-crop output (instruction "refine")
    against the draft and the VAE-through-focus ceiling (the target crop's VAE round trip), per kind of damage.

    Only cases whose draft lies at least `room` dB below the ceiling are kept (else the next is drawn, up to
    max_tries): mild damage the 8x VAE erases anyway leaves nothing to win. reference: "target" gives the
    target crop itself (perfect alignment, same light: the easiest case); "aligned" the registered reference
    (residual misalignment + photometric change, as in training)."""
    cfg = cfg or EditorConfig(region=P.editor_region(bb.preset.name))  # the contexts this editor was trained on
    rows, skipped = [], dict.fromkeys(kinds, 0)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        for j in range(max_tries):
            e = refine_example(
                np.random.default_rng([seed, 4242, i, j]),
                split,
                cfg,
                kind=kind,
                multiple=bb.multiple,
                content=content or ("text" if i % 3 == 0 else None),
            )
            m, x = e["mask"][None], e["target"][None]
            ceil = bb.roundtrip(x).cpu()
            base = {
                k: float(case_metrics(v, x, m)["region_psnr"][0])
                for k, v in dict(draft=e["draft"][None], ceiling=ceil).items()
            }
            if base["draft"] < base["ceiling"] - room:
                break
            skipped[kind] += 1
        else:
            continue  # no case of this kind with room in max_tries draws
        ref = e["target"] if reference == "target" else e["reference"]
        ctx = [bb.encode(x_[None]) for x_ in F_.region_contexts(e["draft"], e["mask"], [ref], cfg.region)]
        z = sample(bb, ctx, "refine", ctx[0].shape, steps=steps, generator=torch.Generator().manual_seed(seed + i))
        rows.append(
            dict(
                kind=kind,
                content=e["content"],
                source=e["source"],
                editor=float(case_metrics(bb.decode(z).cpu(), x, m)["region_psnr"][0]),
                **base,
            )
        )
    by_kind = {
        k: {c: float(np.mean([r[c] for r in rows if r["kind"] == k])) for c in ("editor", "draft", "ceiling")}
        | {"n": sum(r["kind"] == k for r in rows), "skipped_no_room": skipped[k]}
        for k in kinds
        if any(r["kind"] == k for r in rows)
    }
    summary = {c: float(np.mean([r[c] for r in rows])) for c in ("editor", "draft", "ceiling")}
    summary["kinds_above_draft"] = float(np.mean([v["editor"] > v["draft"] for v in by_kind.values()]))
    return dict(rows=rows, by_kind=by_kind, summary=summary, no_room=[k for k in kinds if k not in by_kind])


def oracle_paste(trip) -> torch.Tensor:
    """The degraded context with the true region copied from the reference through the known warp."""
    ref_in_gt = IM.to_tensor(D._warp(IM.to_numpy(trip.reference), trip.warp, trip.target.shape[-1]))
    return trip.mask * ref_in_gt.clamp(0, 1) + (1 - trip.mask) * trip.lowres


@torch.no_grad()
def evaluate(
    bb, n: int = 16, steps: int = 8, seed: int = 0, split: str = "val", cfg: EditorConfig | None = None
) -> dict:
    """Held-out samples per task (Euler from noise) against the no-model baselines, in PSNR/SSIM.

    editor_mean_psnr is the one-step prediction from pure noise, the flow's estimate of the posterior mean
    E[x0 | context]: the PSNR-optimal output, against which a sample trades PSNR for detail.
    Every task also reports the VAE round trip of the target (what any latent editor can reach at best)
    and of the input (the input left as is, in latent space). reconstruct: vs the VAE round trip of the
    input; upscale_x2/x4: vs bicubic; denoise: vs the noisy input; restore: region PSNR vs the degraded
    input, its VAE round trip, the oracle paste, and the same editor given another example's reference
    (editor_wrong_ref: if it matches editor, the reference is ignored), overall, on the strong artifacts
    (EDIT_DEGRADATIONS) and per degradation; every artifact in cfg.restore_degradations equally often."""
    cfg = cfg or EditorConfig(batch=n)
    out, samples = {}, {}
    for i, name in enumerate(EVAL_TASKS):
        task, _, f = name.partition("_x")
        kinds = [
            cfg.restore_degradations[j % len(cfg.restore_degradations)] for j in range(n)
        ]  # each artifact equally often
        b = task_batch(
            task,
            np.random.default_rng([seed, 900 + i]),
            split,
            EditorConfig(**{**cfg.__dict__, "batch": n}),
            factor=int(f) if f else None,
            degradations=kinds,
        )
        x, inp = b["target"], b["contexts"][0]
        ctx = [bb.encode(c) for c in b["contexts"]]
        shape = (n, 16, x.shape[-2] // bb.factor, x.shape[-1] // bb.factor)

        def run(c, k=steps, task=task, shape=shape):
            return bb.decode(sample(bb, c, task, shape, steps=k, generator=torch.Generator().manual_seed(seed))).cpu()

        y, y1 = run(ctx), run(ctx, 1)  # y1: one step from pure noise = E[x0 | context]
        ceil, vin = bb.roundtrip(x).cpu(), bb.decode(ctx[0]).cpu()
        m = (
            b["mask"] if task == "restore" else torch.ones_like(x[:, :1])
        )  # the region: the degraded part, or the whole image
        met = {
            k: case_metrics(v, x, m)
            for k, v in dict(editor=y, editor_mean=y1, input=inp, vae_ceiling=ceil, vae_input=vin).items()
        }
        r = dict(
            editor_psnr=met["editor"]["psnr"].mean().item(),
            editor_ssim=met["editor"]["ssim"].mean().item(),
            editor_mean_psnr=met["editor_mean"]["psnr"].mean().item(),
            input_psnr=met["input"]["psnr"].mean().item(),
            input_ssim=met["input"]["ssim"].mean().item(),
            vae_ceiling_psnr=met["vae_ceiling"]["psnr"].mean().item(),
            vae_input_psnr=met["vae_input"]["psnr"].mean().item(),
        )
        col = "region_psnr" if task == "restore" else "psnr"  # per example, for the claims' paired CIs
        if task == "restore":
            oracle = torch.stack([oracle_paste(t) for t in b["trips"]])
            wrong = [ctx[0], ctx[1].roll(1, 0)]  # each example given another example's reference, same noise
            met["editor_wrong_ref"] = case_metrics(run(wrong), x, m)
            met["oracle"] = case_metrics(oracle, x, m)
            per = {k: v["region_psnr"] for k, v in met.items()}
            r.update(
                {f"{k}_region_psnr": v.mean().item() for k, v in per.items()},
                editor_bg_psnr=case_metrics(y, x, 1 - m)["region_psnr"].mean().item(),
            )
            gain = (per["editor"] - per["editor_wrong_ref"]).numpy()  # dB the true reference buys, per example
            r.update(ref_gain_region_db=float(gain.mean()), ref_gain_region_ci=list(bootstrap_ci(gain, seed=seed)))
            strong = torch.tensor([k in D.EDIT_DEGRADATIONS for k in kinds])
            if strong.any():  # the artifacts the VAE keeps: where the reference is needed
                r.update({f"{k}_region_psnr_strong": v[strong].mean().item() for k, v in per.items()})
            r["by_degradation"] = {
                d: {k: v[[j for j, kd in enumerate(kinds) if kd == d]].mean().item() for k, v in per.items()}
                | {"n": kinds.count(d)}
                for d in sorted(set(kinds))
            }
            r["strong"] = strong.tolist()
        r["per_case"] = {k: [round(float(x), 4) for x in v[col]] for k, v in met.items()}
        out[name] = r
        samples[name] = dict(inputs=[c[:4] for c in b["contexts"]], output=y[:4], target=x[:4])
    return dict(metrics=out, samples=samples)
