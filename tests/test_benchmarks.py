"""The benchmark scripts: the GPU benchmark runs where only torch, transformers, accelerate,
safetensors, einops and imageio are installed (no PyAV), runs end to end on a CPU at small
shapes, and the memory estimate meets the targets (16 x 512x512 fp16 <= 4 GB; 128 frames in
context windows <= 6 GB; 1024x576 x 16 fits an 8 GB card)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{BENCH}", "OMP_NUM_THREADS": "1"}
# What bench_gpu.py's workers import, in a process where `import av` fails as without PyAV.
IMPORTS = "import bench_gpu, memory, sd15; from animatediff.pipeline import AnimationPipeline"


def test_gpu_benchmark_imports_without_pyav(tmp_path):
    (tmp_path / "av.py").write_text("raise ImportError('No module named av')\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV['PYTHONPATH']}"}
    check = [sys.executable, "-c", "import av"]
    assert subprocess.run(check, env=env, capture_output=True).returncode != 0
    proc = subprocess.run([sys.executable, "-c", IMPORTS + "; print('ok')"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu(tmp_path):
    cmd = [sys.executable, str(BENCH / "bench_gpu.py"), "--device", "cpu", "--dtype", "fp32",
           "--arch", "mini", "--frames", "2", "--size", "32", "--steps", "2", "--window-frames",
           "4", "--window-length", "2", "--repeats", "1", "--compile", "none", "--threads", "1",
           "--variants", "diffusers,eager,windowed,deepcache", "--budget", "900",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    rows = {r["which"]: r for r in report["variants"]}
    assert set(rows) == {"diffusers", "eager", "windowed", "deepcache"}
    for r in rows.values():
        assert "error" not in r, r
        s = r["summary"]
        assert s["seconds"] > 0 and s["denoise"] > 0 and s["mfu_measured"] > 0
    assert rows["windowed"]["frames"] == 4 and rows["eager"]["ratio"] > 0
    assert rows["deepcache"]["diff"]["max"] > 0  # an approximation: measured against eager
    assert "| eager |" in (tmp_path / "bench_gpu.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, limit_gb",
    [
        (["--frames", "16", "--size", "512"], 4.0),
        (["--frames", "128", "--size", "512"], 6.0),
        (["--frames", "16", "--height", "576", "--width", "1024"], 8.0),
    ],
)
def test_memory_estimate_meets_the_targets(args, limit_gb):
    cmd = [sys.executable, str(BENCH / "memory.py"), "--dtype", "fp16", "--steps", "1", "--json"]
    proc = subprocess.run(cmd + args, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["total_peak_gib"] * 2**30 / 1e9 <= limit_gb, result
