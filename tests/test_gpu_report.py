"""tools/gpu_report.py (``make gpu-report``): the script a GPU machine runs
once, so it must work the first time.  Here (no GPU) its plumbing runs as a
CPU dry run: the kernel tests under the interpreter, the step benchmark with
the fused CPU backend standing in for Triton."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tools import gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_junit_summary_counts_and_names_the_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.k" name="a"/>'
        '<testcase classname="tests.k" name="b"><failure message="x"/></testcase>'
        '<testcase classname="tests.k" name="c"><error message="y"/></testcase>'
        '<testcase classname="tests.k" name="d"><skipped/></testcase>'
        '</testsuite></testsuites>')
    s = gpu_report.junit_summary(str(xml))
    assert (s["tests"], s["passed"], s["failures"], s["errors"], s["skipped"]) == (4, 1, 1, 1, 1)
    assert s["failing"] == ["tests.k::b", "tests.k::c"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the report for real")
def test_refuses_without_a_gpu_and_writes_nothing(tmp_path, capsys):
    assert gpu_report.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_timeout_kills_the_whole_process_group():
    """A part that runs out of its share is recorded as a timeout, and what
    it started (a compiler, say) does not outlive it."""
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(c.pid, flush=True); time.sleep(60)")
    r = gpu_report._run([sys.executable, "-c", code], dict(os.environ), timeout=3)
    assert r["returncode"] == "timeout" and r["seconds"] < 30
    grandchild = int(r["output_tail"].split()[0])

    def alive():
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
        except (ProcessLookupError, FileNotFoundError):
            return False

    # SIGKILL is delivered asynchronously: allow it a moment on a loaded machine
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(), "the part's child survived its timeout"


def test_cpu_dry_run_writes_one_report(tmp_path):
    """End to end: one JSON with the versions, the kernel tests' counts, and
    the step benchmark's figures; a part that fails makes the exit status 1."""
    cmd = [sys.executable, "tools/gpu_report.py", "--allow-cpu", "--out", str(tmp_path),
           "--parts", "kernel_tests", "step_benchmark", "--select", "rounding",
           "--sizes", "65536", "--repeats", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    [name] = os.listdir(tmp_path)
    assert name.startswith("gpu_report_cpu_dry_run_")
    with open(tmp_path / name) as f:
        r = json.load(f)
    assert r["kind"].startswith("CPU dry run") and r["torch"] == torch.__version__
    assert r["kernel_tests"]["passed"] == 1 and r["kernel_tests"]["failing"] == []
    sizes = r["step_benchmark"]["results"]["sizes"]
    assert [row["numel"] for row in sizes] == [65536]
    for method in ("copy", "zero_sf_cpu", "zero_sf_cpu_compressed", "torch_adamw_fused"):
        assert sizes[0][method]["seconds"] > 0, method


def test_a_failed_part_fails_the_report_and_the_others_still_run(tmp_path, monkeypatch):
    ran = []

    def part(name, ok):
        def run(*args):
            ran.append(name)
            return {"ok": ok, "returncode": 0 if ok else 1, "seconds": 0.0}
        return run

    monkeypatch.setattr(gpu_report, "kernel_tests", part("kernel_tests", False))
    monkeypatch.setattr(gpu_report, "self_check", part("self_check", True))
    monkeypatch.setattr(gpu_report, "step_benchmark", part("step_benchmark", True))
    assert gpu_report.main(["--allow-cpu", "--out", str(tmp_path)]) == 1
    assert ran == ["kernel_tests", "self_check", "step_benchmark"]
    [name] = os.listdir(tmp_path)
    with open(tmp_path / name) as f:
        r = json.load(f)
    assert r["ok"] is False and r["kernel_tests"]["ok"] is False and r["self_check"]["ok"]


def test_kernel_tests_pass_only_when_some_ran_and_none_failed():
    # pytest exits 5 when a selection matches nothing: not a pass
    assert not gpu_report.kernel_tests_passed({"returncode": 5, "passed": 0})
    assert not gpu_report.kernel_tests_passed({"returncode": 0, "passed": 0})
    assert not gpu_report.kernel_tests_passed({"returncode": "timeout", "passed": 40})
    assert not gpu_report.kernel_tests_passed({"returncode": 1, "passed": 40})
    assert gpu_report.kernel_tests_passed({"returncode": 0, "passed": 40})
