"""The whole suite, one command: every benchmark in turn, then the plots, then a summary of every target.

python -m bench.run_all [--smoke] [--only NAME,NAME] [--no-plots]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from bench._common import OUT, table, wrk_path

BENCHMARKS = [
    "http_hot",
    "l1_hit",
    "l2_hit",
    "origin_amplification",
    "stampede",
    "invalidation",
    "writes",
    "cached_vs_uncached",
    "scaling",
    "memory",
]
NEEDS_WRK = {"http_hot", "scaling"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", "--quick", dest="smoke", action="store_true")
    p.add_argument("--only", default="")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or BENCHMARKS
    checks, failed = [], []
    for name in names:
        if name in NEEDS_WRK and wrk_path() is None:
            print(f"-- {name}: skipped (wrk is not installed)")
            continue
        args = ["--out", a.out] + (["--smoke"] if a.smoke else [])
        try:
            res = importlib.import_module(f"bench.{name}").main(args)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        checks += [{"benchmark": name, **c, "met": "yes" if c["met"] else "NO"} for c in res.checks]
    if not a.no_plots:
        from bench.plots import draw

        draw(Path(a.out))
    print("\n== Summary")
    print(table(["benchmark", "what", "ours", "baseline", "ratio", "target", "met"], checks))
    if failed:
        print("failed to run: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
