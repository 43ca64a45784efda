"""Shared harness of the benchmarks: each side runs in a fresh child process, alternating."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["run_child", "alternate", "print_best"]


def run_child(code: str, mode: str, args: list[str], work: Path) -> dict:
    """Run ``code`` in a child Python with ``mode, *args, out`` (a fresh output folder); parse its last JSON line."""
    out = Path(tempfile.mkdtemp(dir=work, prefix=mode))
    for sub in ("images", "labels/nodules", "labels/lungs"):
        (out / sub).mkdir(parents=True)
    res = subprocess.run([sys.executable, "-c", code, mode, *args, str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def alternate(run: Callable[[str], dict], repeats: int) -> list[dict]:
    """``repeats`` rounds of ours and baseline, the order swapped every round; prints each run."""
    runs = []
    for r in range(repeats):
        for mode in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
            runs.append(run(mode))
            print(f"  {mode:8s} {runs[-1]['seconds']:7.2f} s  {runs[-1]['peak_rss_gb']:5.2f} GB", flush=True)
    return runs


def print_best(runs: list[dict], json_path: str | None = None) -> dict:
    """Print the best time and peak memory of each side and their ratio; optionally save them."""
    best = {m: min((x for x in runs if x["mode"] == m), key=lambda x: x["seconds"]) for m in ("ours", "baseline")}
    ratio = best["baseline"]["seconds"] / best["ours"]["seconds"]
    print(f"{'':10s}{'best s':>9s}{'peak GB':>9s}")
    for m in ("ours", "baseline"):
        print(f"{m:10s}{best[m]['seconds']:9.2f}{best[m]['peak_rss_gb']:9.2f}")
    print(f"speed-up (baseline / ours): {ratio:.2f}x")
    if json_path:
        Path(json_path).write_text(json.dumps({"runs": runs, "best": best, "speedup": ratio}, indent=2))
    return best
