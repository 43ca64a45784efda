"""Element-wise mean of several checkpoints of one training run (the cxr bundle's stage 10).

    python docs/experiments/lung_nodule_cxr_drr_segmentation/average_checkpoints.py OUT.pt \\
        run/models/model_epoch=2.pt run/models/model_epoch=4.pt ...

Floating-point tensors (weights and BatchNorm running statistics) are averaged; integer ones
(BatchNorm's batch counters) are taken from the last checkpoint. The checkpoints must be weights-only
state dicts of the same network (the bundle's CheckpointSaver writes them so).
"""

from __future__ import annotations

import argparse
import sys

import torch


def average(paths: list[str]) -> dict[str, torch.Tensor]:
    states = []
    for path in paths:
        try:
            states.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
            raise SystemExit(f"{path}: not a weights-only checkpoint ({type(e).__name__}: {e})") from None
    keys = set(states[0])
    for path, state in zip(paths[1:], states[1:]):
        if set(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise SystemExit(f"{path}: not the same network as {paths[0]} (keys or shapes differ)")
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key].double() for s in states]).mean(0).to(first.dtype)
        else:
            out[key] = states[-1][key].clone()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args(argv)
    torch.save(average(args.checkpoints), args.out)
    print(f"{args.out}: mean of {len(args.checkpoints)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
