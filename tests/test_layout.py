"""The house rules docs/ARCHITECTURE.md states, checked on the source: imports only go down the floors, no
import circle, imports at the top of files except heavy or optional dependencies (each commented once per file)."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "labkit"

FLOORS = {  # 0 core · 1 methods · 2 recipes · 3 entry points · 4 the notebooks' experiments
    0: {"presets", "util", "results", "images", "data", "cases", "objects", "models", "sampling"},
    1: {"focus", "align", "attention", "adapters", "freqmole", "frequency", "losses", "metrics", "editor", "viz"},
    2: {"loop", "vae", "mini", "pretrain", "sft", "rl"},
    3: {"inference", "evaluate", "sweep", "cli", "train", "studio", "studio_app", "__main__", "__init__"},
    4: {"experiments"},
}
FLOOR = {m: f for f, ms in FLOORS.items() for m in ms}
# what may be imported inside a function (a package and its submodules): heavy or optional packages, torch's FSDP
# (~0.8 s, only for --fsdp), and the labkit modules that import one of them at their top (attention: diffusers,
# adapters/freqmole: peft, viz: matplotlib)
LAZY_OK = {
    "diffusers", "transformers", "peft", "accelerate", "matplotlib", "pandas", "papermill", "submitit",
    "ipywidgets", "ipycanvas", "IPython", "huggingface_hub", "sklearn", "skimage", "playwright", "torch.distributed",
    "labkit.attention", "labkit.adapters", "labkit.freqmole", "labkit.viz", "torchao",
}  # fmt: skip


def modules() -> dict[str, Path]:
    """labkit module name (experiments.* folded into 'experiments') -> file."""
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        out[str(rel.with_suffix("")).replace("/", ".")] = p
    return out


def floor_of(name: str) -> int:
    return FLOOR[name.split(".")[0]]


def imports(path: Path, name: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in a file; labkit ones as 'labkit.X'."""
    tree = ast.parse(path.read_text())
    pkg = ["labkit"] + name.split(".")[:-1]
    nested = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name, id(n) in nested, n.lineno) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module != "__future__":
            if n.level:  # relative: from . import x / from .x import y / from ..x import y
                base = pkg[: len(pkg) - n.level + 1]
                mods = [".".join(base + [n.module])] if n.module else [".".join(base + [a.name]) for a in n.names]
            else:
                mods = [n.module]
            out += [(m, id(n) in nested, n.lineno) for m in mods]
    return out


def labkit_deps() -> dict[str, set[str]]:
    """module -> the labkit modules it imports (top level or inside functions)."""
    mods = modules()
    deps = {}
    for name, path in mods.items():
        deps[name] = {
            m.removeprefix("labkit.") for m, _, _ in imports(path, name) if m.startswith("labkit.") and m != "labkit"
        }
    return deps


def test_every_module_has_a_floor():
    missing = [m for m in modules() if m.split(".")[0] not in FLOOR]
    assert not missing, f"add {missing} to a floor in tests/test_layout.py and docs/ARCHITECTURE.md"


def test_imports_only_go_down():
    up = [
        f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
        for a, bs in labkit_deps().items()
        for b in bs
        if a != "__init__" and floor_of(b) > floor_of(a)
    ]
    assert not up, "\n".join(up)


def test_no_import_circle():
    deps = labkit_deps()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(deps.get(m, ())):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(d) :] + [d]) if d in path else d)
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(deps):
        if m not in state and m != "__init__":
            visit(m, [m])


def test_imports_at_the_top_except_heavy_ones_commented_once():
    bad, uncommented = [], []
    for name, path in modules().items():
        lines = path.read_text().split("\n")
        seen: dict[str, bool] = {}
        for mod, inside, line in sorted(imports(path, name), key=lambda t: t[2]):
            if not inside:
                continue
            root = next((k for k in LAZY_OK if mod == k or mod.startswith(k + ".")), mod)
            if root not in LAZY_OK:
                bad.append(f"labkit/{path.relative_to(ROOT)}:{line} imports {mod} inside a function")
            seen.setdefault(root, False)
            seen[root] |= "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")  # on it or just above
        uncommented += [f"labkit/{path.relative_to(ROOT)}: {r}" for r, c in seen.items() if not c]
    assert not bad, "move these to the top of the file:\n" + "\n".join(bad)
    assert not uncommented, "say once per file why these are imported where used:\n" + "\n".join(uncommented)


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """Break the house once: an upward import inside a function is reported by both rules."""
    fake = tmp_path / "labkit"
    fake.mkdir()
    (fake / "data.py").write_text("def f():\n    from .inference import refine\n    return refine\n")
    (fake / "inference.py").write_text("from .data import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    with pytest.raises(AssertionError, match="data \\(floor 0\\) imports inference"):
        test_imports_only_go_down()
    with pytest.raises(AssertionError, match="data.py:2 imports labkit.inference inside a function"):
        test_imports_at_the_top_except_heavy_ones_commented_once()
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circle()


def positional_params(source: str) -> dict[str, int]:
    """function name -> how many parameters it takes positionally (self/cls not counted)."""
    out = {}
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [a.arg for a in n.args.posonlyargs + n.args.args]
            out[n.name] = len(names) - (names[:1] in (["self"], ["cls"]))
    return out


def test_no_function_takes_more_than_eight_positional_parameters():
    """Past eight, a call reads as a row of values (focus_refine once took 17): the rest are keyword-only."""
    assert positional_params("def f(a, b, c, d, e, f, g, h, i): pass") == {"f": 9}  # the counter counts
    assert positional_params("def f(self, a, *, b, c, d, e, f, g, h, i): pass") == {"f": 1}
    wide = {
        f"{p.relative_to(ROOT)}:{name}": k
        for p in modules().values()
        for name, k in positional_params(p.read_text()).items()
        if k > 8
    }
    assert not wide, f"functions with more than 8 positional parameters (make the rest keyword-only): {wide}"


def test_no_pickle_is_loaded_anywhere():
    """Opening someone's checkpoint must not run code: no torch.load without weights_only, no pickle.load."""
    import re
    from pathlib import Path

    bad = []
    for f in sorted(Path(__file__).parents[1].glob("labkit/**/*.py")):
        text = f.read_text()
        bad += [f"{f.name}: {m.group(0)}" for m in re.finditer(r"weights_only\s*=\s*False|pickle\.loads?\(", text)]
    assert not bad, bad
