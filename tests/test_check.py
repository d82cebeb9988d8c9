"""``python -m zero_sf.check``: the self-check users run on a new machine.
On this CPU machine it runs the kernels under the interpreter, a gloo
ZeroOptimizer step and the CPU bandwidth line, and says what it skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from zero_sf import check, spec

ROOT = Path(__file__).resolve().parents[1]


def test_check_passes_on_this_machine_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the check chooses the interpreter itself without CUDA
    proc = subprocess.run([sys.executable, "-m", "zero_sf.check", "--seconds", "0.2",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    status = {line["check"]: line["status"] for line in report["checks"]}
    kernels = [k for k in status if k.startswith("kernel ")]
    assert len(kernels) == len(check.kernel_cases()) and all(status[k] == "PASS" for k in kernels)
    cpu = [k for k in status if k.startswith("cpu backend ")]  # what runs on CPU and offload
    assert len(cpu) == len(check.kernel_cases()) and all(status[k] == "PASS" for k in cpu)
    assert "step bandwidth (CPU: the fused CPU backend, no threshold)" in status
    assert status["ZeroOptimizer step, world size 1 (gloo) == ScheduleFreeAdamW"] == "PASS"
    assert status["kernels on GPU == interpreter, bit for bit"] == "SKIP"
    assert report["environment"]["torch"] == torch.__version__
    assert report["bandwidth"]["sf_step_ms"] > 0
    assert "PASSED: 0 failed" in proc.stdout


def test_check_fails_when_a_kernel_disagrees_with_the_spec(monkeypatch):
    """Test of the check: a spec with eps ten times larger (what a kernel
    with eps misplaced would look like) makes the Schedule-Free lines FAIL."""
    real = spec.sf_adamw_update
    monkeypatch.setattr(spec, "sf_adamw_update",
                        lambda *a, eps, **kw: real(*a, eps=eps * 10, **kw))
    report = check.Report()
    cases = [c for c in check.kernel_cases() if c[0].startswith("sf_adamw")][:2]
    check.check_kernels(report, torch.device("cpu"), cases)
    assert [line["status"] for line in report.lines] == ["FAIL", "FAIL", "SKIP"], report.lines


def test_cpu_backend_check_fails_on_disagreement_and_on_a_silent_fallback(monkeypatch):
    """Test of the check: the same eps mutation makes the CPU backend's
    lines FAIL; a backend that never runs (every tensor refused, the torch
    fallback answering) FAILs too instead of passing as 'cpu backend'."""
    from zero_sf import cpu
    cases = [c for c in check.kernel_cases() if c[0].startswith("sf_adamw")][:2]
    real = spec.sf_adamw_update
    with monkeypatch.context() as m:
        m.setattr(spec, "sf_adamw_update", lambda *a, eps, **kw: real(*a, eps=eps * 10, **kw))
        report = check.Report()
        check.check_cpu_backend(report, cases)
        assert [line["status"] for line in report.lines] == ["FAIL", "FAIL"], report.lines
    monkeypatch.setattr(cpu, "eligible", lambda *a, **k: False)
    report = check.Report()
    check.check_cpu_backend(report, cases)
    assert [line["status"] for line in report.lines] == ["FAIL", "FAIL"], report.lines
    assert "fell back to the torch path" in report.lines[0]["detail"]
