"""benchmarks/gpu_check.py keeps working without a GPU: `--cpu-smoke` runs its whole code path
(building random pipelines in memory, every case next to stock diffusers, the memory meter, the
numerics check) on tiny models on the CPU, and the numerics check does catch a non-finite output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ("stock", "plain", "masked", "strength", "stock_cn", "control")


def test_cpu_smoke_runs_every_case_of_both_families(tmp_path):
    env = {**os.environ, "COLLAGE_CACHE": str(tmp_path)}  # builds in memory: nothing may be cached
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "Stable Diffusion 1.x" in out and "Stable Diffusion XL" in out, out
    for case in CASES:  # a row per case per family, each compared case with a ratio
        rows = re.findall(rf"^{case} +([\d.]+) ", out, re.M)
        assert len(rows) == 2 and all(float(s) > 0 for s in rows), (case, out)
    assert len(re.findall(r"^(plain|masked|strength|control) .*\(<= [\d.]+\)", out, re.M)) == 8, out
    assert out.count("float16 numerics: all finite") == 2 and "numerics ok" in out, out
    assert not list(tmp_path.iterdir())


def test_the_numerics_check_sees_a_nan():
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check import build, numerics

    model, controlnet = build("sd1", "tiny", torch.device("cpu"), torch.float32)
    assert numerics(model, controlnet, 64, 2) == []
    with torch.no_grad():
        model.pipeline.vae.decoder.conv_out.bias[0] = float("nan")
    assert numerics(model, controlnet, 64, 2) == ["vae.decoder: a non-finite output"]
    with torch.no_grad():  # a model output class (a dict), not a tensor, is looked into too
        params = dict(model.pipeline.text_encoder.named_parameters())
        next(p for name, p in params.items() if name.endswith("final_layer_norm.bias"))[0] = float("nan")
    assert "text_encoder: a non-finite output" in numerics(model, controlnet, 64, 2)
