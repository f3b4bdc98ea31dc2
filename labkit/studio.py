"""The refine studio: one image, a region drawn with the mouse, references, and what the editor does with them.

`run` is the headless core (what notebooks/07_studio and the tests call); `Studio` is the widget app on top
of it (ipywidgets + an ipycanvas brush), shown in JupyterLab by `display(Studio(...).widget)`. Everything runs
in the kernel: no local paths in the browser, uploads go through FileUpload, nothing opens a window.

    s = Studio(preset="mini")          # a bundled example is loaded; draw, press Run, press Save
    r = run(draft, mask, [reference])  # the same without widgets: a StudioResult
"""

from __future__ import annotations

import html
import io
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import data as D
from . import focus as F_
from . import inference as I
from . import presets as P
from .align import REGISTRATIONS, warp_reference
from .attention import correspondence, crop_reference
from .metrics import case_metrics

REFERENCE_METHODS = ("paste", "paste_warp", "align", "align_box")  # the methods that copy from a reference
EXAMPLE_KINDS = ("wrong", "lowres4", "smear")  # the bundled examples: benchmark v2's failures, test split


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
        x0, y0, x1, y1 = D.bbox_of(self.mask)
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
def examples(size: int = 128, seed: int = 0) -> dict[str, D.Case]:
    """The bundled examples: one benchmark-v2 failure per kind (test split: fonts, words, scenes never trained
    on), the draft with its region, a reference in another view and light, and the target."""
    out = {}
    for i, kind in enumerate(EXAMPLE_KINDS):
        t = D.make_triplet(seed * 1000 + 17 + i, "test", size, 1, failure=kind, view_strength=0.4)
        out[kind] = D.Case(
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
    cfg = preset_config(preset)
    small = 2 * cfg.multiple
    for name, x in [("image", draft)] + [(f"reference {i}", r) for i, r in enumerate(references)]:
        if min(x.shape[-2:]) < small:
            raise StudioError(
                f"the {name} is {x.shape[-2]}x{x.shape[-1]}: the {cfg.name} preset needs at least {small} px a side; "
                "use a larger image"
            )


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
        return D.bbox_of(F_.seam_mask(mask) > 0)
    return D.bbox_of(mask)


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
    img = D.as_image_tensor(draft)
    drawn = mask is not None and np.asarray(mask, dtype=np.float32).any()  # an empty region: the studio's own message
    m = D.as_mask_tensor(mask, img.shape[-2:]) if drawn else None
    one = references is not None and not isinstance(references, (list, tuple))  # one image, as labkit.refine takes
    refs = D.as_references(references if one else list(references or []))
    check_inputs(img, m, refs, method, preset)
    tgt = D.as_image_tensor(target, "target") if target is not None else None
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
    opts = dict(method=method, adapter=adapter, steps=steps, seed=seed, preset=str(preset), prompt=prompt)
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
    case = D.Case("studio", result.draft, result.references, result.mask, result.target, result.prompt, "test")
    if not result.references:
        raise StudioError("nothing to save as a case: a case needs a reference (add one and run again)")
    how = dict(
        method=result.info.get("method"),
        box=list(result.box),
        seconds=round(result.seconds, 3),
        registration=(result.info.get("registration") or {}).get("used"),
    )
    return D.write_cases(folder, [case], outputs=[result.output], extras=[dict(studio=how)], append=True)


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
            out.append(D.as_image_tensor(Image.open(io.BytesIO(bytes(f["content"])))))
        except Exception as e:  # noqa: BLE001
            raise StudioError(
                f"{f.get('name', 'the upload')} is not an image PIL can read ({e}): upload a PNG or JPEG"
            ) from None
    return out


# ------------------------------------------------------------------------------------------------
# the widget app
class Studio:
    """The refine studio: Inputs (image, region brush/box, references), Settings, Run/Cancel with progress,
    the panels, Save to a case folder. Every error is shown in the status line, never as a traceback."""

    def __init__(
        self,
        preset: str = "mini",
        example: str | None = "wrong",
        cases_dir: str = "studio_cases",
        scale: int = 3,
        method: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        prompt: str = "refine",
    ):
        import ipywidgets as W  # optional: imported where used
        from ipycanvas import Canvas  # optional: imported where used

        self.W = W
        self.draft: torch.Tensor | None = None
        self.target: torch.Tensor | None = None
        self.mask: np.ndarray | None = None  # (H, W) float32 in {0, 1}
        self.references: list = []
        self.result: StudioResult | None = None
        self.scale, self.examples = scale, examples()
        self._cancel, self._thread, self._drag = threading.Event(), None, None
        lay = W.Layout
        # inputs
        self.source = W.Dropdown(
            options=["(none)", *[f"example: {k}" for k in self.examples]],
            description="image",
            value=f"example: {example}" if example in self.examples else "(none)",
        )
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload image")
        self.case_dir = W.Text(value="", placeholder="a case folder (metadata.jsonl)", description="cases")
        self.case_line = W.BoundedIntText(value=0, min=0, max=10**6, description="case #", layout=lay(width="150px"))
        self.load_case = W.Button(description="load case")
        self.ref_upload = W.FileUpload(accept="image/*", multiple=True, description="add reference")
        self.clear_refs = W.Button(description="clear references")
        self.refs_label = W.HTML()
        self.canvas = Canvas(width=128 * scale, height=128 * scale, layout=lay(border="1px solid #999"))
        self.tool = W.ToggleButtons(options=["brush", "box"], value="brush", description="draw")
        self.brush = W.IntSlider(value=6, min=1, max=32, description="brush px")
        self.clear = W.Button(description="clear region", icon="eraser")
        self.mask_preview = W.Image(format="png", layout=lay(width="160px"))
        # settings
        self.preset = W.Combobox(
            value=str(preset),
            options=["tiny", "mini"],
            description="preset",
            placeholder="tiny, mini or a FluxKontextPipeline folder",
        )
        self.method = W.Dropdown(
            options=list(I.METHODS), value=method or I.REFINE_DEFAULTS["method"], description="method"
        )
        self.adapter = W.Dropdown(options=["(frozen editor)", *I.describe_adapters()], description="adapter")
        self.steps = W.IntSlider(
            value=steps or preset_config(str(preset)).steps,  # the preset's default (a pipeline folder: flux-kontext's)
            min=1,
            max=50,
            description="steps",
        )
        self.strength = W.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="strength")
        self.blend = W.Checkbox(value=bool(I.REFINE_DEFAULTS["blend"]), description="blend (keep outside the region)")
        # with a registration (method align): labkit.refine's val-chosen switches, each its default
        self.switches = {  # made from inference.RefineOptions: its align switches, their help as the tooltip
            f.name: W.Checkbox(
                value=f.default, description=f"{f.name.replace('_', ' ')} (align)", tooltip=f.metadata["help"]
            )
            for f in fields(I.RefineOptions)
            if f.name in I.ALIGN_SWITCHES
        }
        self.seed = W.IntText(value=seed, description="seed")
        self.prompt = W.Text(value=prompt, description="prompt")
        # run, output, save
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, description="steps")
        self.status = W.HTML()
        self.time_label = W.HTML()
        self.panels = {
            k: W.Image(format="png", layout=lay(width="200px"))
            for k in ("output", "change", "before", "after", "reference", "overlay")
        }
        self.filmstrip = W.HBox(layout=lay(flex_flow="row wrap"))
        self.cases_dir = W.Text(value=cases_dir, description="save to")
        self.save_button = W.Button(description="Save case", icon="save", disabled=True)
        self.saved = W.HTML()
        # events
        self.source.observe(self._guard(lambda _: self._load_source()), names="value")
        self.upload.observe(self._guard(lambda _: self._load_upload()), names="value")
        self.ref_upload.observe(self._guard(lambda _: self._add_refs()), names="value")
        self.load_case.on_click(self._guard(lambda _: self.load_case_folder(self.case_dir.value, self.case_line.value)))
        self.clear_refs.on_click(self._guard(lambda _: self.set_references([])))
        self.clear.on_click(self._guard(lambda _: self.clear_region()))
        self.run_button.on_click(self._guard(lambda _: self.run()))
        self.cancel_button.on_click(lambda _: self.cancel())
        self.save_button.on_click(self._guard(lambda _: self.save()))
        self.canvas.on_mouse_down(self._guard(self._down))
        self.canvas.on_mouse_move(self._guard(self._move))
        self.canvas.on_mouse_up(self._guard(self._up))
        for name, w in dict(
            canvas=self.canvas,
            run=self.run_button,
            cancel=self.cancel_button,
            save=self.save_button,
            clear=self.clear,
            **{f"panel-{k}": v for k, v in self.panels.items()},
        ).items():
            w.add_class(f"studio-{name}")  # stable handles for the browser test and custom CSS
        self.widget = self._layout()
        self._guard(lambda _: self._load_source())(None)

    # ---------------------------------------------------------------- layout and errors
    def _layout(self):
        W = self.W
        label = lambda t: W.HTML(f"<b>{t}</b>")  # noqa: E731
        p = self.panels
        box = lambda name, w: W.VBox([W.HTML(name), w])  # noqa: E731
        inputs = W.VBox(
            [
                label("Inputs"),
                self.source,
                W.HBox([self.upload]),
                W.HBox([self.case_dir, self.case_line, self.load_case]),
                W.HBox([self.ref_upload, self.clear_refs]),
                self.refs_label,
                self.tool,
                self.brush,
                self.clear,
                W.HTML("region"),
                self.mask_preview,
            ]
        )
        settings = W.VBox(
            [
                label("Settings"),
                self.preset,
                self.method,
                self.adapter,
                self.steps,
                self.strength,
                self.blend,
                *self.switches.values(),
                self.seed,
                self.prompt,
                W.HBox([self.run_button, self.cancel_button]),
                self.progress,
                self.status,
                self.time_label,
                W.HBox([self.cases_dir, self.save_button]),
                self.saved,
            ]
        )
        shows = W.VBox(
            [
                label("Output"),
                W.HBox(
                    [
                        box("output", p["output"]),
                        box("|output - draft|", p["change"]),
                        box("M* on the reference", p["overlay"]),
                    ]
                ),
                W.HBox(
                    [
                        box("zoom: before", p["before"]),
                        box("zoom: after", p["after"]),
                        box("zoom: aligned reference", p["reference"]),
                    ]
                ),
                W.HTML("denoising: the x0 prediction at each step"),
                self.filmstrip,
            ]
        )
        return W.VBox([W.HBox([self.canvas, inputs, settings]), shows], layout=W.Layout(width="100%"))

    def _guard(self, fn):
        """Run a callback; an error becomes the status line (a StudioError as is, anything else with its type)."""

        def wrapped(*a):
            try:
                return fn(*a)
            except StudioError as e:
                self.error(str(e))
            except Exception as e:  # noqa: BLE001 - the widget shows every failure as a message
                self.error(f"{type(e).__name__}: {e}")

        return wrapped

    def error(self, msg: str) -> None:
        """Show an error in the status line."""
        self.status.value = f"<span style='color:#b00020' class='studio-error'>{html.escape(msg)}</span>"

    def say(self, msg: str) -> None:
        """Show a message in the status line."""
        self.status.value = f"<span class='studio-status'>{html.escape(msg)}</span>"

    # ---------------------------------------------------------------- inputs
    def set_image(self, draft, references=(), target=None, mask=None) -> None:
        """Load an image (and optionally its references, target and region); the canvas is resized to it."""
        img = D.as_image_tensor(draft)
        self.draft, self.target = img, None if target is None else D.as_image_tensor(target)
        h, w = img.shape[-2:]
        self.canvas.width, self.canvas.height = w * self.scale, h * self.scale
        self.mask = np.zeros((h, w), np.float32) if mask is None else D.as_mask_tensor(mask, (h, w))[0].numpy().copy()
        self.set_references(list(references))
        self.result = None
        self.save_button.disabled = True
        self._redraw()
        self.say(f"image {h}x{w} loaded")

    def _load_source(self) -> None:
        v = self.source.value
        if v.startswith("example: "):
            c = self.examples[v.removeprefix("example: ")]
            self.set_image(c.draft, c.references, c.target, c.mask)

    def _load_upload(self) -> None:
        imgs = read_upload(self.upload.value)
        if imgs:
            self.source.value = "(none)"
            self.set_image(imgs[0])

    def _add_refs(self) -> None:
        self.set_references(self.references + read_upload(self.ref_upload.value))

    def load_case_folder(self, folder: str, index: int = 0) -> None:
        """Load case `index` of a case folder (its draft, references, mask and target)."""
        if not folder:
            raise StudioError("type a case folder's path (relative to the notebook) first")
        cases = D.load_cases(folder)
        if not 0 <= index < len(cases):
            raise StudioError(f"{folder} holds {len(cases)} cases: choose case # 0..{len(cases) - 1}")
        c = cases[index]
        self.source.value = "(none)"
        self.set_image(c.draft, c.references, c.target, c.mask)

    def set_references(self, refs: list) -> None:
        """Replace the references."""
        self.references = [D.as_image_tensor(r) for r in refs]
        sizes = ", ".join(f"{r.shape[-2]}x{r.shape[-1]}" for r in self.references)
        self.refs_label.value = f"{len(self.references)} reference(s) {sizes}"

    # ---------------------------------------------------------------- the region
    def _xy(self, x: float, y: float) -> tuple[int, int]:
        return int(x // self.scale), int(y // self.scale)

    def paint(self, x: float, y: float) -> None:
        """Brush a disk into the region at canvas pixel (x, y)."""
        if self.mask is None:
            raise StudioError("load an image before drawing")
        cx, cy = self._xy(x, y)
        r = self.brush.value
        yy, xx = np.ogrid[: self.mask.shape[0], : self.mask.shape[1]]
        self.mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        self.canvas.fill_style = "rgba(255, 40, 40, 0.45)"
        self.canvas.fill_circle(x, y, r * self.scale)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Add the rectangle between two canvas pixels to the region."""
        if self.mask is None:
            raise StudioError("load an image before drawing")
        (a, b), (c, d) = self._xy(min(x0, x1), min(y0, y1)), self._xy(max(x0, x1), max(y0, y1))
        self.mask[b : d + 1, a : c + 1] = 1
        self._redraw()

    def clear_region(self) -> None:
        """Empty the region."""
        if self.mask is not None:
            self.mask[:] = 0
        self._redraw()

    def _down(self, x, y):
        self._drag = (x, y)
        if self.tool.value == "brush":
            self.paint(x, y)

    def _move(self, x, y):
        if self._drag is not None and self.tool.value == "brush":
            self.paint(x, y)

    def _up(self, x, y):
        if self._drag is not None and self.tool.value == "box":
            self.box(*self._drag, x, y)
        self._drag = None
        self._preview()

    def _redraw(self) -> None:
        """The image, the region in red on top, and the mask preview."""
        from ipycanvas import hold_canvas

        if self.draft is None:
            return
        img = outline(self.draft, torch.from_numpy(self.mask)[None])
        big = np.kron((as_display(img) * 255).round().astype(np.uint8), np.ones((self.scale, self.scale, 1), np.uint8))
        with hold_canvas():
            self.canvas.clear()
            self.canvas.put_image_data(big, 0, 0)
        self._preview()

    def _preview(self) -> None:
        if self.mask is not None:
            self.mask_preview.value = png(torch.from_numpy(self.mask)[None].expand(3, -1, -1), 160)

    # ---------------------------------------------------------------- run, cancel, save
    def settings(self) -> dict:
        """The run's keyword arguments from the widgets."""
        ad = self.adapter.value
        return dict(
            preset=self.preset.value.strip(),
            method=self.method.value,
            adapter=None if ad == "(frozen editor)" else ad,
            steps=self.steps.value,
            strength=self.strength.value,
            blend=self.blend.value,
            **{k: w.value for k, w in self.switches.items()},
            seed=self.seed.value,
            prompt=self.prompt.value or None,
        )

    def run(self, wait: bool = False) -> StudioResult | None:
        """Refine with the current inputs and settings: in a thread (the Cancel button stays live), or inline when
        wait=True (headless). Input problems are shown before anything starts."""
        if self._thread is not None and self._thread.is_alive():
            raise StudioError("a run is in progress: wait for it or press Cancel")
        kw = self.settings()
        mask = None if self.mask is None else torch.from_numpy(self.mask.copy())[None]
        check_inputs(self.draft, mask, self.references, kw["method"], kw["preset"])
        load(
            kw["preset"], kw["adapter"]
        )  # a preset or adapter that does not load is said now, not from the thread (cached)
        self._cancel.clear()
        self.progress.value, self.progress.max = 0, kw["steps"]
        self.run_button.disabled, self.cancel_button.disabled, self.save_button.disabled = True, False, True
        self.say(f"running {kw['method']} on {kw['preset']} ...")
        job = lambda: self._run_body(mask, kw)  # noqa: E731
        if wait:
            return job()
        self._thread = threading.Thread(target=job, daemon=True)
        self._thread.start()
        return None

    def _run_body(self, mask: torch.Tensor, kw: dict) -> StudioResult | None:
        def step(i: int, n: int) -> None:
            self.progress.max, self.progress.value = n, i

        try:
            res = run(self.draft, mask, self.references, target=self.target, on_step=step, cancel=self._cancel, **kw)
        except Cancelled as e:
            self.say(f"{e}: nothing kept")
            return None
        except StudioError as e:
            self.error(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - shown, never raised into the widget
            self.error(f"{type(e).__name__}: {e}")
            return None
        finally:
            self.run_button.disabled, self.cancel_button.disabled = False, True
        self.show(res)
        return res

    def show(self, res: StudioResult) -> None:
        """Fill the panels from a result."""
        self.result = res
        zoom = res.zoom()
        self.panels["output"].value = png(res.output, 200)
        self.panels["change"].value = png(res.change, 200)
        for k in ("before", "after", "reference"):
            self.panels[k].value = png(zoom[k], 200) if k in zoom else b""
        self.panels["overlay"].value = png(res.overlay, 200) if res.overlay is not None else b""
        self.filmstrip.children = [
            self.W.Image(value=png(f, 96), format="png", layout=self.W.Layout(width="96px")) for f in res.filmstrip
        ]
        m = res.metrics()
        psnr = (
            f" · region PSNR {m['draft_region_psnr']:.2f} → {m['output_region_psnr']:.2f} dB"
            if "output_region_psnr" in m
            else ""
        )
        self.time_label.value = f"<span class='studio-time'>{res.seconds:.2f} s{psnr}</span>"
        self.save_button.disabled = False
        self.say(
            f"done: {res.info.get('method')}"
            + (f", registration {res.info['registration'].get('used')}" if res.info.get("registration") else "")
        )

    def cancel(self) -> None:
        """Stop the running refine after its current step."""
        self._cancel.set()
        self.say("cancelling after the current step ...")

    def save(self) -> Path:
        """Append the last run to the case folder in 'save to'."""
        if self.result is None:
            raise StudioError("nothing to save yet: press Run first")
        folder = save(self.result, self.cases_dir.value.strip() or "studio_cases")
        n = sum(1 for x in (folder / "metadata.jsonl").read_text().splitlines() if x.strip())
        self.saved.value = (
            f"<span class='studio-saved'>saved: {folder} ({n} cases) - `labkit evaluate --data {folder}`</span>"
        )
        return folder
