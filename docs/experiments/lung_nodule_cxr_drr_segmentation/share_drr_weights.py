"""Widen a cxr checkpoint to DRR depth slabs with the DRR's stem weights shared out (its stage 15).

    python docs/experiments/lung_nodule_cxr_drr_segmentation/share_drr_weights.py START.pt OUT.pt \\
        --slabs 3 --drr-share 0.5

`init_checkpoint` widens a checkpoint to slab inputs with zero weights for them, and training left
them at a tenth of the DRR's (stages 9 and 11). Here the attention path's first convolution keeps
``drr-share`` of the DRR channel's weights for the DRR, and each slab gets an equal part of the rest,
so a slab image equal to the DRR would leave the stem's output unchanged, and the slabs weigh from the
first step. Every other weight is START's. OUT is a weights-only state dict for
``--init_checkpoint`` with ``--drr_slab_keys`` of that many slabs.
"""

from __future__ import annotations

import argparse
import sys

import torch

STEM = "attention.stem.0.weight"


def share(state: dict[str, torch.Tensor], slabs: int, drr_share: float) -> dict[str, torch.Tensor]:
    if STEM not in state:
        raise SystemExit(f"no {STEM} in the checkpoint: not a lung_nodule_cxr_drr_segmentation network")
    w = state[STEM]
    if w.shape[1] != 1:
        raise SystemExit(f"{STEM} already takes {w.shape[1]} inputs; START must be a checkpoint without slabs")
    if not 0.0 < drr_share < 1.0 or slabs < 1:
        raise SystemExit("--drr-share must be in (0, 1) and --slabs at least 1")
    out = dict(state)
    out[STEM] = torch.cat([w * drr_share] + [w * (1.0 - drr_share) / slabs] * slabs, dim=1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("start")
    parser.add_argument("out")
    parser.add_argument("--slabs", type=int, default=3)
    parser.add_argument("--drr-share", type=float, default=0.5)
    args = parser.parse_args(argv)
    try:
        state = torch.load(args.start, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
        raise SystemExit(f"{args.start}: not a weights-only checkpoint ({type(e).__name__}: {e})") from None
    state = state.get("model", state)
    torch.save(share(state, args.slabs, args.drr_share), args.out)
    print(f"{args.out}: {STEM} {tuple(state[STEM].shape)} -> {1 + args.slabs} inputs, DRR share {args.drr_share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
