"""The refine studio (labkit.studio): the headless core and the widget app driven from code, on tiny.
The browser test (tests/browser) drives the same app with mouse events in headless Chromium."""

import io
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from labkit import cases as CS
from labkit import images as IM
from labkit import studio as S
from labkit import studio_app as SA
from labkit.studio_app import Studio


@pytest.fixture(scope="module")
def case():
    return S.examples()["wrong"]


@pytest.fixture
def app(tmp_path):
    pytest.importorskip("ipycanvas")
    return Studio(preset="tiny", example="wrong", cases_dir=str(tmp_path / "cases"), steps=3)


@pytest.mark.parametrize("method", ["focus", "align", "paste_warp"])
def test_run_changes_pixels_only_inside_the_box(case, method):
    r = S.run(case.draft, case.mask, case.references, preset="tiny", method=method, steps=3, target=case.target)
    x0, y0, x1, y1 = r.box
    inside = r.change[y0:y1, x0:x1]
    assert S.changed_outside(r) == 0 and float(inside.max()) > 0
    assert len(r.filmstrip) == (0 if method == "paste_warp" else 3)  # one x0 frame per sampling step
    assert r.overlay.shape == (*case.references[0].shape[-2:], 3) and r.attention.max() == pytest.approx(1.0)
    m = r.metrics()
    assert m["changed_outside_box"] == 0 and np.isfinite(m["output_region_psnr"]) and m["seconds"] > 0


def test_full_method_changes_outside_the_region_without_blend(case):
    r = S.run(
        case.draft, case.mask, case.references, preset="tiny", method="full", steps=2, blend=False, show_overlay=False
    )
    x0, y0, x1, y1 = IM.bbox_of(case.mask)
    c = r.change.clone()
    c[y0:y1, x0:x1] = 0
    assert int((c > 0).sum()) > 0  # the whole image is regenerated: pixels outside the region change ...
    assert r.box == (0, 0, 128, 128)  # ... so the box it may touch is the whole image,
    assert S.changed_outside(replace(r, info={**r.info, "method": "input"})) > 0  # the region's box would not hold


def test_filmstrip_frames_are_the_steps_x0_predictions(case):
    r = S.run(
        case.draft, case.mask, case.references, preset="tiny", method="focus", steps=4, blend=False, show_overlay=False
    )
    assert len(r.filmstrip) == 4 and not torch.equal(r.filmstrip[0], r.filmstrip[-1])  # the prediction moves
    ref = S.I.load_refiner("tiny")
    x0s = []
    out = S.I.edit(ref, case.draft, case.references, steps=3, seed=0, callback=lambda i, n, x0: x0s.append(x0))
    assert len(x0s) == 3  # after the last Euler step (sigma -> 0) the sample is that step's x0 prediction
    assert torch.allclose(ref.bb.decode(x0s[-1])[0].float(), out, atol=1e-4)


def test_cancel_stops_between_steps(case):
    ev, seen = threading.Event(), []

    def step(i, n):
        seen.append(i)
        if i == 2:
            ev.set()

    with pytest.raises(S.Cancelled, match="after 3 of 6"):
        S.run(case.draft, case.mask, case.references, preset="tiny", method="focus", steps=6, on_step=step, cancel=ev)
    assert seen == [1, 2]


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(mask=torch.zeros(1, 128, 128)), "no region"),
        (dict(references=[]), "copies from a reference"),
        (dict(preset="nonsense"), "unknown preset"),
        (dict(preset="/no/such/pipeline"), "does not load"),
        (dict(draft=torch.rand(3, 8, 8), mask=torch.ones(1, 8, 8)), "at least 16x16"),
    ],
)
def test_bad_inputs_are_studio_errors_naming_the_fix(case, bad, needle):
    kw = dict(draft=case.draft, mask=case.mask, references=case.references, preset="tiny", method="align") | bad
    with pytest.raises(S.StudioError, match=needle):
        S.run(kw.pop("draft"), kw.pop("mask"), kw.pop("references"), **kw)


def test_save_appends_a_case_that_loads_back(case, tmp_path):
    r = S.run(case.draft, case.mask, case.references, preset="tiny", steps=2, target=case.target, prompt="refine")
    folder = S.save(r, tmp_path / "c")
    S.save(r, tmp_path / "c")
    cases = CS.load_cases(folder)
    assert [c.name for c in cases] == ["case000", "case001"] and cases[0].prompt == "refine"
    assert torch.allclose(cases[0].draft, case.draft, atol=1 / 255) and torch.equal(cases[0].mask, case.mask)
    out = IM.as_image_tensor(Image.open(folder / "case001_output.png"))
    assert torch.allclose(out, r.output, atol=1 / 255)


def test_read_upload_reads_images_and_names_a_bad_file():
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(buf, format="PNG")
    (img,) = S.read_upload(({"name": "a.png", "content": memoryview(buf.getvalue())},))
    assert img.shape == (3, 40, 48) and float(img.mean()) == pytest.approx(200 / 255)
    with pytest.raises(S.StudioError, match="notes.txt is not an image"):
        S.read_upload(({"name": "notes.txt", "content": b"hello"},))


# ------------------------------------------------------------------------------------------------ the widget app
def test_brush_and_box_draw_the_region_in_image_pixels(app):
    app.clear_region()
    assert app.mask.sum() == 0
    app.brush.value = 3
    app.paint(30 * app.scale, 40 * app.scale)  # canvas pixels -> image pixel (30, 40)
    ys, xs = np.nonzero(app.mask)
    assert app.mask[40, 30] == 1 and xs.min() == 27 and xs.max() == 33 and ys.min() == 37 and ys.max() == 43
    app.clear_region()
    app.tool.value = "box"
    app._down(10 * app.scale, 12 * app.scale)
    app._up(20 * app.scale, 30 * app.scale)
    ys, xs = np.nonzero(app.mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 20, 12, 30)


def test_run_button_fills_the_panels_and_save_writes_the_case_folder(app, tmp_path):
    app.clear_region()
    app.box(40, 40, 200, 160)
    res = app.run(wait=True)
    assert res is not None and "studio-error" not in app.status.value
    assert app.panels["output"].value[:4] == b"\x89PNG" and app.panels["change"].value[:4] == b"\x89PNG"
    assert len(app.filmstrip.children) == 3 and "s" in app.time_label.value and not app.save_button.disabled
    assert S.changed_outside(res) == 0
    folder = app.save()
    assert (folder / "case000_output.png").exists() and "1 cases" in app.saved.value
    assert len(CS.load_cases(folder)) == 1


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda a: a.clear_region(), "no region"),
        (lambda a: a.set_references([]), "copies from a reference"),
        (lambda a: setattr(a.preset, "value", "/no/such/pipeline"), "does not load"),
        (
            lambda a: a.set_image(torch.rand(3, 8, 8), [torch.rand(3, 8, 8)], mask=torch.ones(1, 8, 8)),
            "at least 16x16",
        ),
    ],
)
def test_run_button_shows_errors_in_the_widget_not_a_traceback(app, setup, needle):
    setup(app)
    app.run_button.click()  # the button's handler: no exception escapes
    assert "studio-error" in app.status.value and needle in app.status.value
    assert app.result is None and app.save_button.disabled


def test_save_before_run_is_a_message(app):
    app.save_button.disabled = False
    app.save_button.click()
    assert "press Run first" in app.status.value


def test_threaded_run_can_be_cancelled(app, monkeypatch):
    app.steps.value = 50
    app.method.value = "focus"
    gate = threading.Event()
    orig = SA.run  # the widget's own reference to the core's run

    def slow_run(*a, on_step=None, **kw):
        def step(i, n):
            gate.set()
            on_step(i, n)
            threading.Event().wait(0.05)

        return orig(*a, on_step=step, **kw)

    monkeypatch.setattr(SA, "run", slow_run)
    app.run()
    assert gate.wait(60)
    app.cancel_button.click()
    app._thread.join(60)
    assert "cancelled after" in app.status.value and app.result is None and not app.run_button.disabled


def test_the_registration_switches_reach_refine(app):
    """The studio's relight / vae-detail / paste-first boxes start at labkit.refine's defaults and reach refine_tensor
    (its info records them when the registration holds)."""
    from labkit.inference import REFINE_DEFAULTS

    assert {k: w.value for k, w in app.switches.items()} == {k: REFINE_DEFAULTS[k] for k in app.switches}
    app.method.value = "align"
    for k, w in app.switches.items():
        w.value = not REFINE_DEFAULTS[k]
    r = app.run(wait=True)
    assert r.info["registration"]["used"] == "warp"  # the bundled example registers
    assert {k: r.info[k] for k in app.switches} == {k: not REFINE_DEFAULTS[k] for k in app.switches}
    assert app.settings()["paste_first"] is (not REFINE_DEFAULTS["paste_first"])


def test_the_do_no_harm_switch_reaches_refine_and_the_status_says_what_was_kept(app):
    app.method.value = "align"
    app.accept.value = True
    res = app.run(wait=True)
    assert res is not None and res.info["accept"]["kept"] in ("editor", "paste", "shifted paste", "draft")
    assert f"kept the {res.info['accept']['kept']}" in app.status.value and "registration" in app.status.value
