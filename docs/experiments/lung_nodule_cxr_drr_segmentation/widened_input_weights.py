"""How much a widened network uses the inputs it was widened with (the cxr bundle's stages 8-11).

    python docs/experiments/lung_nodule_cxr_drr_segmentation/widened_input_weights.py START.pt TRAINED.pt

START is the checkpoint the run was widened from (`init_checkpoint`), TRAINED one of the run's own.
For every weight whose input-channel count grew (the attention stem for DRR slabs, the decoder's
first convolutions for `drr_skips`), prints the mean norm of one input channel's weights over the
channels START already had and over the new ones (which `init_checkpoint` starts at zero). A ratio
far below 1 means training left the new inputs nearly unused.
"""

from __future__ import annotations

import argparse
import sys

import torch


def channel_norms(start: dict, trained: dict) -> list[tuple[str, float, float]]:
    rows = []
    for key, new in trained.items():
        old = start.get(key)
        if old is None or old.dim() < 2 or old.shape == new.shape or old.shape[1] >= new.shape[1]:
            continue
        n_old = old.shape[1]
        per_channel = new.transpose(0, 1).reshape(new.shape[1], -1).double().norm(dim=1)
        rows.append((key, float(per_channel[:n_old].mean()), float(per_channel[n_old:].mean())))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("start")
    parser.add_argument("trained")
    args = parser.parse_args(argv)
    start = torch.load(args.start, map_location="cpu", weights_only=True)
    trained = torch.load(args.trained, map_location="cpu", weights_only=True)
    rows = channel_norms(start, trained)
    if not rows:
        print(f"{args.trained}: no weight has more input channels than in {args.start}")
        return 1
    print("weight,old_channel_norm,new_channel_norm,ratio")
    for key, old, new in rows:
        print(f"{key},{old:.4f},{new:.4f},{new / old:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
