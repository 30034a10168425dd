"""benchmarks/throughput.py and report.py run end to end on a tiny configuration."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"student", "teachers", "placement", "data", "path", "micro_batch", "images_per_s",
              "step_ms", "breakdown_ms", "peak_memory_gib", "flops_per_image", "mfu"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_benchmark_and_report_end_to_end(tmp_path):
    out = tmp_path / "throughput_tiny_cpu.json"
    cmd = [sys.executable, "benchmarks/throughput.py", "--preset", "cpu", "--device", "cpu",
           "--students", "T", "--teacher-arch", "T", "--teacher-counts", "0,2",
           "--img-size", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1",
           "--teacher-variants", "2", "--data", "synthetic", "--data-probe", "",
           "--dedicated", "1:1", "--dedicated-cell", "T:2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["benchmark"] == "throughput" and result["preset"] == "cpu"
    assert "benchmarks/throughput.py" in result["command"]
    machine = result["machine"]
    assert machine["device_type"] == "cpu" and machine["cpu"]
    assert {"torch", "deepspeed", "timm"} <= set(machine["versions"])
    assert result["peak_flops"]["flops"] > 0 and "measured" in result["peak_flops"]["source"]

    rows = result["rows"]
    assert {(r["teachers"], r["path"]) for r in rows} == {(0, "fast"), (0, "reference"),
                                                          (2, "fast"), (2, "reference")}
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["images_per_s"] > 0 and r["peak_memory_gib"] > 0 and 0 < r["mfu"] < 1
        assert set(r["breakdown_ms"]) == {"data", "teacher", "student", "optimizer", "other"}
    fast2 = next(r for r in rows if r["teachers"] == 2 and r["path"] == "fast")
    assert fast2["speedup_vs_reference"] > 0
    assert fast2["flops_per_image"]["teachers"] > 0
    variants = {v["variant"] for v in result["teacher_variants"]}
    assert {"fp32 loop", "fp32 stacked"} <= variants
    assert result["teacher_choice"]["mode"] in ("loop", "stacked")

    placements = {r["placement"]: r for r in result["placement_rows"]}
    assert set(placements) == {"colocated", "dedicated"}
    assert placements["dedicated"]["teacher_ranks"] == 1
    assert placements["colocated"]["student_ranks"] == 2
    assert all(r["images_per_s"] > 0 for r in placements.values())

    proc = subprocess.run([sys.executable, "benchmarks/report.py", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "cost_vs_teachers_cpu_cpu.md").read_text()
    assert "| ViT-T | 2 |" in md and "Teacher execution variants" in md
    png = tmp_path / "cost_vs_teachers_cpu_cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
