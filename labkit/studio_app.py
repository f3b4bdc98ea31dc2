"""The refine studio's widget app (notebook 07): ipywidgets + an ipycanvas brush on top of the headless core in
labkit.studio (`run`, `save`, the checks and panels), shown in JupyterLab by `display(Studio(...).widget)`. Everything
runs in the kernel: no local paths in the browser, uploads go through FileUpload, nothing opens a window.

    s = Studio(preset="mini")          # a bundled example is loaded; draw, press Run, press Save
"""

from __future__ import annotations

import html
import threading
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from . import cases as CS
from . import images as IM
from . import inference as I
from .studio import (
    Cancelled,
    StudioError,
    StudioResult,
    as_display,
    check_inputs,
    examples,
    load,
    outline,
    png,
    preset_config,
    read_upload,
    run,
    save,
)  # fmt: skip


class Studio:
    """The refine studio: Inputs (image, region brush/box, references), Settings, Run/Cancel with progress,
    the panels, Save to a case folder. Every error is shown in the status line, never as a traceback."""

    def __init__(
        self,
        preset: str = "mini",
        example: str | None = "wrong",
        cases_dir: str = "studio_cases",
        *,
        scale: int = 3,
        method: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        prompt: str = "refine",
        resolution: int | None = None,
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
        self.resolution = resolution  # the focus crop's working side (None: the preset's; 512 on a small card)
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
        self.accept = W.Checkbox(value=bool(I.REFINE_DEFAULTS["accept"]), description="do no harm (accept check)")
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
                self.accept,
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
        img = IM.as_image_tensor(draft)
        self.draft, self.target = img, None if target is None else IM.as_image_tensor(target)
        h, w = img.shape[-2:]
        self.canvas.width, self.canvas.height = w * self.scale, h * self.scale
        self.mask = np.zeros((h, w), np.float32) if mask is None else IM.as_mask_tensor(mask, (h, w))[0].numpy().copy()
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
        cases = CS.load_cases(folder)
        if not 0 <= index < len(cases):
            raise StudioError(f"{folder} holds {len(cases)} cases: choose case # 0..{len(cases) - 1}")
        c = cases[index]
        self.source.value = "(none)"
        self.set_image(c.draft, c.references, c.target, c.mask)

    def set_references(self, refs: list) -> None:
        """Replace the references."""
        self.references = [IM.as_image_tensor(r) for r in refs]
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
            accept=self.accept.value,
            **{k: w.value for k, w in self.switches.items()},
            seed=self.seed.value,
            prompt=self.prompt.value or None,
            resolution=self.resolution,
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
        reg, fell, kept = (res.info.get(k) for k in ("registration", "fallback", "accept"))
        self.say(
            f"done: {res.info.get('method')}"
            + (f", registration {reg.get('used')} ({reg.get('scope')})" if reg else "")
            + (f", fell back to {fell['to']}: {fell['why']}" if fell else "")
            + (f", kept the {kept['kept']} (do-no-harm check: {kept})" if kept else "")
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
