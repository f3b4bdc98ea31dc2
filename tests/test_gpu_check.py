"""`make gpu-check` (bench/gpu_check.py): without CUDA it says so and exits 0 having done nothing; the same code on
the tiny config on CPU measures both sampling loops and both LoRA steps and writes its table as JSON."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_without_cuda_does_nothing_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _module().main(["--out", str(tmp_path / "g.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "g.json").exists()


def test_gpu_check_code_path_on_the_tiny_config(tmp_path):
    out = tmp_path / "g.json"
    gc = _module()
    assert gc.main(["--tiny", "--device", "cpu", "--size", "32", "--steps", "2", "--rank", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {(t["what"], t["path"]) for t in r["table"]}
    assert len(rows) == 6 and {p for _, p in rows} == {"plain", "labkit"}
    assert all(t["seconds"] > 0 and t["tflops"] > 0 for t in r["table"])
    # the FLOP estimate grows with the sequence as a transformer's must: linear term + quadratic attention
    cfg = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1)
    f1, f2, f4 = (gc.transformer_flops(cfg, s, 0) for s in (100, 200, 400))
    assert f2 > 2 * f1 and f4 / f2 > f2 / f1 * 0.99
