"""The refine studio's headless core: one image, a region, references, and what the editor does with them - `run`
(a StudioResult with the panels: output, change map, M* overlay, filmstrip), `save` (into a case folder), the
studio's input checks and the bundled examples. The widget app on top is labkit.studio_app.Studio (notebook 07).

    r = run(draft, mask, [reference])  # a StudioResult
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import cases as CS
from . import data as D
from . import focus as F_
from . import images as IM
from . import inference as I
from . import presets as P
from .align import REGISTRATIONS, warp_reference
from .attention import correspondence, crop_reference
from .metrics import case_metrics

REFERENCE_METHODS = ("paste", "paste_warp", "align", "align_box")  # the methods that copy from a reference


class StudioError(ValueError):
    """A problem with the studio's inputs, said as what to do (shown in the widget, never as a traceback)."""


class Cancelled(RuntimeError):
    """The run was cancelled between two sampling steps; nothing was kept."""


@dataclass
class StudioResult:
    """One studio run: its inputs, the output and what the panels show."""

    draft: torch.Tensor  # (3, H, W)
    mask: torch.Tensor  # (1, H, W) in {0, 1}
    references: list  # of (3, h, w)
    output: torch.Tensor  # (3, H, W)
    info: dict  # refine_tensor's (method, boxes, registration, ...)
    seconds: float
    prompt: str | None = None
    target: torch.Tensor | None = None
    filmstrip: list = field(default_factory=list)  # the x0 prediction after each step, decoded (3, h, w)
    overlay: np.ndarray | None = None  # (H_ref, W_ref, 3) the reference with M* as a heat overlay
    attention: np.ndarray | None = None  # (h, w) M* on the reference's token grid, in [0, 1]

    @property
    def change(self) -> torch.Tensor:
        """|output - draft|, the largest channel: (H, W)."""
        return change_map(self.output, self.draft)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) the pixels a method may touch: the focus box, else the region's bounding box."""
        return box_of(self.info, self.mask)

    def zoom(self, margin: int = 8) -> dict[str, torch.Tensor]:
        """before / after / reference crops of the region's box (the reference as the editor saw it aligned)."""
        x0, y0, x1, y1 = IM.bbox_of(self.mask)
        b = (
            max(0, x0 - margin),
            max(0, y0 - margin),
            min(self.draft.shape[-1], x1 + margin),
            min(self.draft.shape[-2], y1 + margin),
        )
        out = dict(before=F_.crop(self.draft, b), after=F_.crop(self.output, b))
        ref = reference_as_seen(self.info, self.draft, self.mask, self.references)
        if ref is not None:
            out["reference"] = F_.crop(ref, b) if ref.shape[-2:] == self.draft.shape[-2:] else ref
        return out

    def metrics(self) -> dict[str, float]:
        """Region PSNR of the draft and the output against the target (when the image has one), and the time."""
        out = dict(seconds=self.seconds, changed_outside_box=changed_outside(self))
        if self.target is not None:
            for k, v in dict(draft=self.draft, output=self.output).items():
                out[f"{k}_region_psnr"] = float(
                    case_metrics(v[None], self.target[None], self.mask[None])["region_psnr"][0]
                )
        return out


# ------------------------------------------------------------------------------------------------
# the headless core
def examples(size: int = 128, seed: int = 0) -> dict[str, CS.Case]:
    """The bundled examples: one benchmark-v2 failure per kind (test split: fonts, words, scenes never trained
    on), the draft with its region, a reference in another view and light, and the target."""
    out = {}
    for i, kind in enumerate(D.BENCHMARK_KINDS):
        t = D.make_triplet(seed * 1000 + 17 + i, "test", size, 1, failure=kind, view_strength=0.4)
        out[kind] = CS.Case(
            f"example_{kind}",
            t.draft,
            [t.reference],
            t.mask,
            t.target,
            "refine",
            "test",
            dict(kind=kind, ref_mask=t.ref_mask),
        )  # ref_mask: where the region lies in the reference
    return out


def check_inputs(
    draft: torch.Tensor | None, mask: torch.Tensor | None, references: list, method: str | None, preset: str
) -> None:
    """Raise StudioError naming the fix: no image, no region drawn, no reference for a copying method, too small."""
    if draft is None:
        raise StudioError("no image: pick a bundled example, load a case folder, or upload an image")
    if mask is None or float(mask.sum()) == 0:
        raise StudioError("no region: draw it on the image (brush or box) before pressing Run")
    method = method or I.REFINE_DEFAULTS["method"]
    if method not in I.METHODS:
        raise StudioError(f"unknown method {method!r}: choose one of {I.METHODS}")
    if method in REFERENCE_METHODS and not references:
        raise StudioError(
            f"method {method!r} copies from a reference: add one (upload or case folder), or pick 'focus'/'full'"
        )
    unit = preset_config(preset).multiple  # the entry's own check (labkit.refine), its message as the studio's
    for name, x in [("image", draft)] + [(f"reference {i}", r) for i, r in enumerate(references)]:
        try:
            IM.as_image_tensor(x, name, min_side=unit)
        except ValueError as e:
            raise StudioError(str(e)) from None


def preset_config(preset: str) -> P.Preset:
    """The preset (a name, or a FluxKontextPipeline folder) as a StudioError naming the choices if it is neither."""
    try:
        return P.get(preset)
    except ValueError as e:
        raise StudioError(str(e)) from None


def load(preset: str, adapter: str | None = None) -> I.Refiner:
    """The editor for a preset name or pipeline folder; a folder that does not load is a StudioError saying why."""
    preset_config(preset)
    try:
        return I.load_refiner(str(preset), adapter)
    except Exception as e:  # noqa: BLE001 - any loader failure is shown to the user as a message
        raise StudioError(
            f"preset {preset!r} does not load ({type(e).__name__}: {e}); give tiny, mini or a "
            "FluxKontextPipeline folder (save_pretrained layout)"
        ) from None


def change_map(output: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """|output - draft| as the largest channel difference: (H, W)."""
    return (output - draft).abs().amax(0)


def box_of(info: dict, mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) the pixels a method may change: the focus box (focus/align), the soft seam's extent (the
    registered paste), the whole image (full), else the region's bounding box (paste, input)."""
    if "box" in info:
        return tuple(info["box"])
    if info.get("method") == "full":
        return 0, 0, mask.shape[-1], mask.shape[-2]
    if (info.get("registration") or {}).get("used") == "warp" and info.get("method") == "paste_warp":
        return IM.bbox_of(F_.seam_mask(mask) > 0)
    return IM.bbox_of(mask)


def changed_outside(r: StudioResult) -> int:
    """Pixels changed outside the box a method may touch (0 for focus/align with their soft paste back)."""
    x0, y0, x1, y1 = r.box
    c = r.change.clone()
    c[y0:y1, x0:x1] = 0
    return int((c > 0).sum())


def reference_as_seen(info: dict, draft: torch.Tensor, mask: torch.Tensor, references: list) -> torch.Tensor | None:
    """The first reference as the editor saw it: warped into the draft's frame (the registration, memoised),
    cropped by M*'s box, or as given."""
    if not references:
        return None
    if (info.get("registration") or {}).get("used") == "warp":
        reg = REGISTRATIONS(draft, mask, references[0], info.get("seed", 0))
        return warp_reference(references[0], reg.matrix, tuple(draft.shape[-2:]), reg.flow)
    if "reference_box" in info:
        return crop_reference(references[0], info["reference_box"], out_size=None, multiple=1)
    return references[0]


def overlay(reference: torch.Tensor, attention: np.ndarray) -> np.ndarray:
    """The reference with M* (where the draft's region attends in it) as a heat overlay: (H, W, 3) in [0, 1]."""
    from matplotlib import colormaps  # heavy: imported where used

    heat = upsample_map(attention, reference.shape[-2:]).numpy()
    rgb = colormaps["inferno"](heat)[..., :3]
    return (0.45 * reference.permute(1, 2, 0).numpy() + 0.55 * rgb).clip(0, 1)


def upsample_map(grid: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """A token-grid map (h, w) bilinearly to pixels (H, W)."""
    g = torch.from_numpy(np.asarray(grid, np.float32))[None, None]
    return torch.nn.functional.interpolate(g, size=tuple(hw), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)


def attention_in_region(attention: np.ndarray, ref_mask: torch.Tensor) -> float:
    """How concentrated M* is on the region's counterpart in the reference: mean M* inside / mean M* overall
    (1 = no better than uniform)."""
    a = upsample_map(attention, ref_mask.shape[-2:])
    m = ref_mask[0] > 0.5
    return float(a[m].mean() / (a.mean() + 1e-8))


def run(
    draft,
    mask,
    references=(),
    *,
    preset: str = "mini",
    method: str | None = None,
    adapter: str | None = None,
    steps: int | None = None,
    strength: float = 1.0,
    seed: int = 0,
    prompt: str | None = None,
    resolution: int | None = None,
    target=None,
    on_step=None,
    cancel: threading.Event | None = None,
    filmstrip: bool = True,
    show_overlay: bool = True,
    **switches,
) -> StudioResult:
    """One refine as the studio runs it: labkit.refine_tensor plus the panels (filmstrip of x0 predictions,
    M* overlay). on_step(i, n) after every step; cancel.set() stops between steps (raises Cancelled).
    switches: inference.SWITCHES (blend, relight, ...), each None or absent for labkit.refine's default."""
    img = IM.as_image_tensor(draft)
    drawn = mask is not None and np.asarray(mask, dtype=np.float32).any()  # an empty region: the studio's own message
    m = IM.as_mask_tensor(mask, img.shape[-2:]) if drawn else None
    one = references is not None and not isinstance(references, (list, tuple))  # one image, as labkit.refine takes
    refs = IM.as_references(references if one else list(references or []))
    check_inputs(img, m, refs, method, preset)
    tgt = IM.as_image_tensor(target, "target") if target is not None else None
    if tgt is not None and tgt.shape != img.shape:
        size = f"the target is {tuple(tgt.shape[-2:])} but the image is {tuple(img.shape[-2:])}"
        raise StudioError(f"{size}: give the target at the image's size")
    r = load(preset, adapter)
    frames: list = []

    def callback(i: int, n: int, x0: torch.Tensor) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after {i + 1} of {n} steps")
        if filmstrip:
            frames.append(r.bb.decode(x0)[0].float().clamp(0, 1).cpu())
        if on_step is not None:
            on_step(i + 1, n)

    t0 = time.perf_counter()
    unknown = set(switches) - set(I.SWITCHES)
    if unknown:
        raise StudioError(f"unknown switch(es) {sorted(unknown)}: choose from {I.SWITCHES}")
    opts = dict(
        method=method, adapter=adapter, steps=steps, seed=seed, preset=str(preset), prompt=prompt, resolution=resolution
    )
    out, info = I.refine_tensor(img, m, refs or None, strength=strength, callback=callback, **opts, **switches)
    seconds = time.perf_counter() - t0
    att = correspondence(r, img, m, refs[0], seed=seed) if show_overlay and refs else None
    return StudioResult(
        img,
        m,
        refs,
        out.clamp(0, 1),
        info,
        seconds,
        info.get("prompt", prompt),
        tgt,
        frames,
        None if att is None else overlay(refs[0], att),
        att,
    )


def save(result: StudioResult, folder: str | Path) -> Path:
    """Append what was tried (draft, mask, references, output, prompt; the target when known) to a case folder,
    so it becomes an evaluation set for `labkit evaluate --data FOLDER`."""
    case = CS.Case("studio", result.draft, result.references, result.mask, result.target, result.prompt, "test")
    if not result.references:
        raise StudioError("nothing to save as a case: a case needs a reference (add one and run again)")
    how = dict(
        method=result.info.get("method"),
        box=list(result.box),
        seconds=round(result.seconds, 3),
        registration=(result.info.get("registration") or {}).get("used"),
    )
    return CS.write_cases(folder, [case], outputs=[result.output], extras=[dict(studio=how)], append=True)


def figure(result: StudioResult):
    """The studio's panels as one matplotlib figure: draft + region, output, change map, zoom, M*, filmstrip."""
    import matplotlib.pyplot as plt

    zoom = result.zoom()
    top = [
        ("draft + region", outline(result.draft, result.mask)),
        ("output", result.output),
        ("|output - draft|", result.change),
        *[(f"zoom: {k}", v) for k, v in zoom.items()],
    ]
    if result.overlay is not None:
        top.append(("M* on the reference", result.overlay))
    film = result.filmstrip
    cols = max(len(top), len(film), 1)
    fig, axes = plt.subplots(2 if film else 1, cols, figsize=(1.9 * cols, 4.2 if film else 2.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, x) in zip(axes[0], top):
        ax.imshow(as_display(x), cmap="magma" if torch.is_tensor(x) and x.ndim == 2 else None)
        ax.set_title(title, fontsize=8)
    for i, (ax, x) in enumerate(zip(axes[1] if film else [], film)):
        ax.imshow(as_display(x))
        ax.set_title(f"x0 @ step {i + 1}", fontsize=8)
    fig.suptitle(f"{result.info.get('method')} · {result.seconds:.1f} s", fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# pixels for the widgets
def as_display(x) -> np.ndarray:
    """A tensor (3, H, W) / (H, W) or an array as (H, W[, 3]) floats for imshow/PNG."""
    a = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    return a.transpose(1, 2, 0) if a.ndim == 3 and a.shape[0] in (1, 3) else a


def outline(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with its region tinted red (the mask preview)."""
    red = torch.tensor([1.0, 0.1, 0.1])[:, None, None]
    return img * (1 - 0.45 * mask) + 0.45 * mask * red


def png(x, size: int | None = None) -> bytes:
    """PNG bytes of an image or a (H, W) map (magma), upscaled with nearest neighbours to `size` px wide."""
    a = as_display(x)
    if a.ndim == 2:
        from matplotlib import colormaps

        a = colormaps["magma"](a / (a.max() + 1e-8))[..., :3]
    im = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    if size and im.width != size:
        im = im.resize((size, max(1, round(im.height * size / im.width))), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def read_upload(value) -> list[torch.Tensor]:
    """FileUpload's value (ipywidgets 8: a tuple of dicts with name/content) as image tensors; a file that is
    not an image is a StudioError naming it."""
    out = []
    for f in value or ():
        try:
            out.append(IM.as_image_tensor(Image.open(io.BytesIO(bytes(f["content"])))))
        except Exception as e:  # noqa: BLE001
            raise StudioError(
                f"{f.get('name', 'the upload')} is not an image PIL can read ({e}): upload a PNG or JPEG"
            ) from None
    return out


# ------------------------------------------------------------------------------------------------
# the widget app
