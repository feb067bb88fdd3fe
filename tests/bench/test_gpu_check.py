"""`make gpu-check` cannot rot between GPU runs: its smoke mode runs here, on the CPU.

The smoke goes through the same path a GPU machine without network takes: a payload made
by bench.gpu_payload (θ0 as float16, real test data), then every section of the check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section_and_every_check_holds(tmp_path: Path) -> None:
    payload, out = tmp_path / "payload", tmp_path / "gpu.json"
    made = _run("bench.gpu_payload", str(payload), "--fmnist-rows", "200")
    assert made.returncode == 0, made.stderr[-3000:]
    done = _run("bench.gpu_check", "--smoke", "--device", "cpu", "--payload", str(payload),
                "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["failures"] == []
    presets = doc["results"]["presets"]
    assert set(presets) == {"effnet-lite0", "minilm"}
    for name, res in presets.items():
        corr = res["correctness"]
        assert corr["passed"], (name, corr)
        assert corr["forget_bit_exact"] and corr["weight1_round_trip_max_abs"] == 0.0
        for dtype in ("bfloat16", "float16"):
            assert res["dtypes"][dtype]["composed"]["finite"], (name, dtype)
        assert res["timings"]["flops"]["floor"] > 1.0
        assert set(res["timings"]["by_n_ms_batch32"]) == {"1", "5"}
    assert presets["effnet-lite0"]["compile"]["max_abs_error"] <= 1e-4
    http = presets["effnet-lite0"]["http"]
    assert http["http"]["errors"] == 0 and http["http"]["throughput_inputs_per_s"] > 0
    assert doc["settings"]["payload"]  # the rounding of θ0 for transport is recorded
