"""``python -m showcase --out demo``: the main job on the demo world (see showcase/__init__.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from showcase.pipeline import run_main_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="showcase", description=__doc__)
    p.add_argument("--out", default="demo", help="output folder (default demo)")
    p.add_argument("--patients", type=int, default=8, help="demo patients (default 8)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for data preparation (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo world (default 0)")
    args = p.parse_args(argv)
    report, n_bad = run_main_job(Path(args.out), patients=args.patients, workers=args.workers, seed=args.seed)
    print(f"\nreport: {report.resolve()}  (open it in a browser)")
    if n_bad:
        print(f"{n_bad} stage(s) did not succeed: see the report's last section")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
