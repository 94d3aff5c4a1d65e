"""bench/gpu.py: without a GPU it refuses with exit status 2 unless --cpu-smoke, which runs every section's code on
tiny shapes on the CPU and writes figures that hang together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
# No GPU for the child, whatever the machine: the refusal and the smoke run are what is tested.
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=NO_GPU,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_without_a_gpu_it_refuses(tmp_path):
    out = tmp_path / "results.json"
    result = run("--out", str(out), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs a CUDA GPU" in result.stderr and "--cpu-smoke" in result.stderr
    assert not out.exists()


def test_unknown_sections_are_refused():
    from bench import gpu

    with pytest.raises(SystemExit) as stopped:
        gpu.main(["--sections", "featurize,warp-drive"])
    assert stopped.value.code == 2


def test_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "results.json"
    result = run("--cpu-smoke", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures == json.loads(result.stdout)
    assert figures["smoke"] is True and figures["device"]["bandwidth_gbps"] is None

    featurize = figures["featurize"]["results"]
    assert {(r["shape"], r["dtype"]) for r in featurize} == {
        (shape, dtype) for shape in ("qwen2-tiny", "llama-tiny") for dtype in ("bfloat16", "float32")
    }
    for row in featurize:
        # 2 blocks x (q, v) x (A, B) LoRA units + the head
        assert row["units"] == 9 and row["rows"] == 2 and row["tokens_per_row"] == 16
        rates, tokens = row["rows_per_s"], row["tokens_per_s"]
        assert rates["floor"] > 0 and rates["ours"] > 0
        assert tokens["ours"] == pytest.approx(16 * rates["ours"], rel=1e-3)
        assert len(row["ratios"]) == 2 and min(row["ratios"]) <= row["ratio"] <= max(row["ratios"])

    scoring = figures["scoring"]
    assert {(r["rows"], r["m"]) for r in scoring["results"]} == {
        (where, m) for where in ("resident", "streamed", "cpu") for m in (1, 8)
    }
    for row in scoring["results"]:
        expected_gbps = row["n"] * 16 * 2 * row["layers"] / row["seconds"] / 1e9
        assert row["gbps"] == pytest.approx(expected_gbps, rel=0.02) and row["of_card"] is None
    assert scoring["max_relative_difference_vs_cpu"] < 1e-5

    faiss = figures["faiss"]
    assert [(r["kind"], r["device"]) for r in faiss["results"]] == [("flat", "cpu"), ("ivf", "cpu")]
    assert faiss["results"][0]["recall_at_10"] == 1.0 and "no GPU rows" in faiss["note"]

    query = figures["query"]
    assert query["units"] == 9 and query["rows"] == 3000
    for where in ("resident", "streamed"):
        assert 0 < query[where]["p50_ms"] <= query[where]["p95_ms"]
