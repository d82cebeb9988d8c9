"""The GPU run, in one command (``make gpu-report``): what a machine with a GPU
checks and measures, written to one JSON under ``benchmarks/results/``.

    python tools/gpu_report.py [--out benchmarks/results] [--budget-s 270]

1. ``tests/kernels/test_triton_kernels.py`` compiled on the GPU, the
   interpreter off (``ZERO_SF_TEST_DEVICE=cuda``; the slow sizes included);
2. the self-check, ``python -m zero_sf.check`` (kernels vs the spec, GPU ==
   interpreter bit for bit, a ZeroOptimizer step over NCCL, bandwidth);
3. the step benchmark (``benchmarks/step_throughput.py``): the fused
   Schedule-Free AdamW step on a ZeRO shard of a bf16 model (fp32 master) and
   with compressed state, against a device copy of the same bytes and
   ``torch.optim.AdamW(fused=True)``, at 1M-256M elements.

It needs only torch, Triton and pytest (no registry, no DeepSpeed:
``ZERO_SF_SKIP_MISSING=1`` skips the tests that need what is missing), and
gives each part a share of ``--budget-s`` (default 270 s: under 5 minutes on
an H100/H200).  A part that fails or runs out of time is recorded as such,
the others still run; the exit status is 1 if anything failed.

``--allow-cpu`` runs the same plumbing on a CPU machine (the kernel tests
under the interpreter), for the test of this script; its figures are not a
GPU report and the file says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ["1e6", "4e6", "16e6", "64e6", "256e6"]
# shares of the budget: compiling ~200 kernel specializations dominates part 1
SHARES = {"kernel_tests": 0.45, "self_check": 0.25, "step_benchmark": 0.30}


def _env(cuda: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               ZERO_SF_SKIP_MISSING="1")
    if cuda:
        env["ZERO_SF_TEST_DEVICE"] = "cuda"
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(cmd: list[str], env: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    # its own session: on a timeout the whole group goes (a compiler a
    # benchmark started included), not only the child
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        rc = "timeout"
    return {"command": " ".join(cmd), "returncode": rc,
            "seconds": round(time.perf_counter() - t0, 1), "output_tail": out[-3000:]}


def junit_summary(path: str) -> dict:
    """Counts and the failing test ids of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = failing
    return counts


def kernel_tests(env: dict, timeout: float, select: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "kernels.xml")
        cmd = [sys.executable, "-m", "pytest", "tests/kernels/test_triton_kernels.py", "-q",
               "-m", "", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        if select:
            cmd += ["-k", select]
        out = _run(cmd, env, timeout)
        if os.path.exists(xml):
            out.update(junit_summary(xml))
    out["ok"] = kernel_tests_passed(out)
    return out


def kernel_tests_passed(out: dict) -> bool:
    """pytest exited 0 and ran something (a selection matching nothing exits 5)."""
    return out["returncode"] == 0 and out.get("passed", 0) > 0


def self_check(env: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check.json")
        out = _run([sys.executable, "-m", "zero_sf.check", "--seconds", "1", "--json", path],
                   env, timeout)
        if os.path.exists(path):
            with open(path) as f:
                out["report"] = json.load(f)
    lines = out.get("report", {}).get("checks", [])
    out["counts"] = {s: sum(1 for x in lines if x["status"] == s)
                     for s in ("PASS", "FAIL", "SKIP", "INFO")}
    out["ok"] = out["returncode"] == 0 and out["counts"]["PASS"] > 0
    return out


# the fused step (a bf16 model's ZeRO shard with fp32 master; compressed
# state), the copy of the same bytes, torch's fused AdamW, and the torch path;
# on the CPU dry run the fused CPU backend stands in for Triton
METHODS = {True: ["copy", "zero_sf_triton", "zero_sf_triton_compressed", "torch_adamw_fused",
                  "zero_sf_torch", "schedulefree_foreach"],
           False: ["copy", "zero_sf_cpu", "zero_sf_cpu_compressed", "torch_adamw_fused"]}


def step_benchmark(env: dict, timeout: float, sizes: list[str], repeats: int,
                   cuda: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "benchmarks/step_throughput.py", "--sizes", *sizes,
               "--repeats", str(repeats), "--out", tmp, "--tag", "report",
               "--methods", *METHODS[cuda]]
        out = _run(cmd, env, timeout)
        path = os.path.join(tmp, "step_throughput_report.json")
        if os.path.exists(path):
            with open(path) as f:
                out["results"] = json.load(f)
    out["ok"] = out["returncode"] == 0 and "results" in out
    return out


def device_name(cuda: bool) -> str:
    if cuda:
        import torch
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--sizes", nargs="*", default=SIZES)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--select", default=None, help="pytest -k for the kernel tests")
    ap.add_argument("--parts", nargs="*", default=list(SHARES), choices=list(SHARES))
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run on a CPU machine (tests this script; not a GPU report)")
    args = ap.parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_report: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or pass --allow-cpu to test the script", file=sys.stderr)
        return 2
    env = _env(cuda)
    t0 = time.perf_counter()
    report = {"kind": "gpu report" if cuda else "CPU dry run of the GPU report (not GPU figures)",
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "device": device_name(cuda), "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    try:
        report["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                              capture_output=True, text=True).stdout.strip()
    except OSError:
        report["git_commit"] = None
    budget = args.budget_s
    parts = [("kernel_tests", lambda s: kernel_tests(env, s, args.select)),
             ("self_check", lambda s: self_check(env, s)),
             ("step_benchmark", lambda s: step_benchmark(env, s, args.sizes, args.repeats, cuda))]
    parts = [(n, fn) for n, fn in parts if n in args.parts]
    for name, fn in parts:
        left = budget - (time.perf_counter() - t0)
        share = max(30.0, min(left, SHARES[name] * budget))
        print(f"gpu_report: {name} (up to {share:.0f} s) ...", flush=True)
        report[name] = fn(share)
        r = report[name]
        print(f"gpu_report: {name}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s"
              f" (exit {r['returncode']})", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["ok"] = all(report[n]["ok"] for n, _ in parts)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", report["device"]).strip("_").lower() or "device"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu_report_{'' if cuda else 'cpu_dry_run_'}{tag}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    kt = report.get("kernel_tests", {})
    print(f"kernel tests: {kt.get('passed', 0)} passed, {kt.get('failures', 0)} failed, "
          f"{kt.get('errors', 0)} errors, {kt.get('skipped', 0)} skipped")
    print(f"self-check: {report.get('self_check', {}).get('counts')}")
    for row in report.get("step_benchmark", {}).get("results", {}).get("sizes", []):
        cells = [f"{m} {v['seconds'] * 1e3:.3f} ms" for m, v in row.items()
                 if isinstance(v, dict) and "seconds" in v]
        print(f"step {row['numel']:>11,d}: " + ", ".join(cells))
    print(f"wrote {path} ({report['seconds']} s; {'ok' if report['ok'] else 'FAILED'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
