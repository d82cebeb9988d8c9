"""The scenario generator from the command line.

    python -m tests.scenarios --pool torch --seed 123     # one scenario (a reproducer)
    python -m tests.scenarios --count 500 --start 1000    # seeds 1000..1499, every pool
    python -m tests.scenarios --minutes 30                # random seeds until time is up (make fuzz)

Prints every failure with its seed and reproducer, then a summary; exit
status 1 when any scenario failed.  ``--json FILE`` keeps every result.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time

from .generate import POOLS, generate
from .pool import report, run_pool


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.scenarios", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", choices=sorted(POOLS), action="append",
                    help="pools to run (default: all)")
    ap.add_argument("--seed", type=int, action="append", help="run these seeds only")
    ap.add_argument("--start", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--count", type=int, default=100, help="seeds per pool and round")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="keep running rounds of --count seeds until this much time is spent")
    ap.add_argument("--json", help="write every result to this file")
    args = ap.parse_args(argv)
    pools = args.pool or list(POOLS)
    start = args.start if args.start is not None else random.randrange(10**6, 10**9)
    t0 = time.monotonic()
    results: list[dict] = []
    while True:
        for pool in pools:
            seeds = args.seed or list(range(start, start + args.count))
            if args.seed:
                for s in seeds:
                    print(f"{pool} seed {s}: {generate(s, pool).describe()}", flush=True)
            got = run_pool(pool, seeds)
            for r in got:
                r["pool"] = pool
            results += got
            failed = [r for r in got if r["failures"]]
            print(f"{pool}: seeds {seeds[0]}..{seeds[-1]}: {len(got)} run, {len(failed)} failed "
                  f"({time.monotonic() - t0:.0f} s so far)", flush=True)
            if failed:
                print(report(failed), flush=True)
        start += args.count
        if args.seed or time.monotonic() - t0 >= args.minutes * 60:
            break
    by_engine = collections.Counter(r["engine"] for r in results)
    failed = [r for r in results if r["failures"]]
    print(f"\n{len(results)} scenarios ({dict(by_engine)}) in {time.monotonic() - t0:.0f} s: "
          f"{len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
