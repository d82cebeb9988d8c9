"""Regression tests as pinned scenarios: a defect's configuration, written
out, run through the same engines and compared with the same reference as
the generator's (one spawned pool per call)."""

from __future__ import annotations

import os
import zlib

from .generate import Scenario
from .pool import report, run_pool


def pin(name: str, **fields) -> Scenario:
    """A scenario of the torch pool (``engine="deepspeed"``: of DeepSpeed's)
    named ``name``; its seed (data, initial weights) comes from the name."""
    pool = "deepspeed" if fields.get("engine") == "deepspeed" else "torch"
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    fields.setdefault("grouping", "one")
    fields.setdefault("rule", "sf")
    fields.setdefault("data", "same")
    return Scenario(pool=pool, seed=10**6 + zlib.crc32(name.encode()) % 10**6,
                    pinned=f"{test} ({name})", **fields)


def check(*scenarios: Scenario) -> None:
    """Run the scenarios (one pool each kind); fail naming every one that failed."""
    failed = []
    for pool in sorted({sc.pool for sc in scenarios}):
        mine = [sc for sc in scenarios if sc.pool == pool]
        results = run_pool(pool, mine)
        assert [r["seed"] for r in results] == [sc.seed for sc in mine]
        failed += [r for r in results if r["failures"]]
    assert not failed, f"{len(failed)} of {len(scenarios)} scenarios failed:\n" + report(failed)
