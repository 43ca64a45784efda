"""Evaluate a probability ensemble of cxr checkpoints with the bundle's own evaluation (its stage 14).

    python docs/experiments/lung_nodule_cxr_drr_segmentation/evaluate_ensemble.py \\
        --dataset-dir SET --fold 0 --out OUT --combine max \\
        --member 070/model.pt:2 --member run13/models/model_epoch=48.pt:5

Each ``--member`` is ``CHECKPOINT:IN_CHANNELS`` (2: X-ray and DRR; 5: X-ray, DRR and three depth
slabs). A member reads the first IN_CHANNELS channels of the bundle's input (X-ray, DRR, then
``drr_slab0..2``), so a 2-channel model and a slab model share one input; with any member above 2
channels the slabs are loaded from the datalist. The ensemble's probability (nodule and attention
maps) is the mean or the maximum of the members' sigmoid outputs, passed on as its logit, so the
evaluation config thresholds it at ``mask_threshold`` as for one network. ``--fold all`` evaluates
every pair of the datalist (the new draw). Writes ``per_image.csv`` and ``metrics.csv`` to OUT,
exactly as the bundle's ``evaluate.json`` (its PerImageMetrics handler).

Test-time flips (its stage 16): ``--flip lr`` averages each member's probabilities with those of the
pair flipped along the axis training flips (``RandFlipd`` spatial axis 1, the image's last dimension)
and flipped back; ``--flip ud`` does the same along the other axis. ``--threshold`` replaces the
evaluation's ``mask_threshold`` (0.5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "lung_nodule_cxr_drr_segmentation"
SLABS = ["drr_slab0", "drr_slab1", "drr_slab2"]


class ProbabilityEnsemble(nn.Module):
    """Mean or maximum of the members' sigmoid outputs, returned as logits."""

    def __init__(
        self, members: list[nn.Module], in_channels: list[int], combine: str, flip_dims: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.in_channels = in_channels
        self.combine = combine
        self.flip_dims = flip_dims

    def member_probability(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(member(x))
        if self.flip_dims:
            p = 0.5 * (p + torch.sigmoid(member(x.flip(self.flip_dims))).flip(self.flip_dims))
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([self.member_probability(m, x[:, :c]) for m, c in zip(self.members, self.in_channels)])
        p = probs.mean(0) if self.combine == "mean" else probs.amax(0)
        return torch.logit(p.clamp(1e-6, 1.0 - 1e-6))


def parse_member(text: str) -> tuple[str, int]:
    path, _, channels = text.rpartition(":")
    if not path or not channels.isdigit() or int(channels) not in (2, 2 + len(SLABS)):
        raise SystemExit(f"--member {text!r}: expected CHECKPOINT:2 or CHECKPOINT:{2 + len(SLABS)}")
    return path, int(channels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset-dir", required=True, help="DRR set (data_prep drr; with --drr-slabs 3 for slab members)"
    )
    parser.add_argument("--fold", required=True, help="validation fold, or 'all' for every pair")
    parser.add_argument("--out", required=True)
    parser.add_argument("--combine", choices=["mean", "max"], default="max")
    parser.add_argument("--member", action="append", required=True, help="CHECKPOINT:IN_CHANNELS (repeat)")
    parser.add_argument("--flip", choices=["none", "lr", "ud"], default="none", help="test-time flip (see above)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="mask threshold (default: the config's mask_threshold)"
    )
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    members = [parse_member(m) for m in args.member]
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise SystemExit(f"--threshold {args.threshold}: expected a probability strictly between 0 and 1")

    sys.path.insert(0, str(BUNDLE))
    from monai.bundle import ConfigParser

    import scripts.network  # the bundle's own package

    config = ConfigParser()
    config.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "evaluate.json")])
    nets = []
    for path, channels in members:
        net = scripts.network.CxrDrrFusionNet(
            in_channels=channels,
            backbone_width=config["backbone_width"],
            attention_channels=config["attention_channels"],
            decoder_channels=config["decoder_channels"],
        )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state.get("model", state))
        except Exception as e:  # noqa: BLE001 - any unreadable or unfitting file is reported by name
            raise SystemExit(
                f"{path}: not a weights-only checkpoint of a {channels}-channel network "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            ) from None
        nets.append(net.eval())
    flip_dims = {"none": (), "lr": (-1,), "ud": (-2,)}[args.flip]
    ensemble = ProbabilityEnsemble(nets, [c for _, c in members], args.combine, flip_dims).eval()
    update = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": args.dataset_dir,
        "image_size": args.image_size,
        "num_workers": 0,
        "output_dir": args.out,
        "drr_slab_keys": SLABS if max(c for _, c in members) > 2 else [],
        "network": ensemble,
        # the members' weights are loaded above: evaluate.json's handlers without its CheckpointLoader
        "validate#handlers": [h for h in config["validate#handlers"] if h.get("_target_") != "CheckpointLoader"],
    }
    if args.threshold is not None:
        update["mask_threshold"] = args.threshold
    if args.fold == "all":
        update["validate#dataset#data"] = "$scripts.io.read_datalist(@datalist)"
    else:
        update["val_fold"] = int(args.fold)
    config.update(update)
    with torch.no_grad():
        config.get_parsed_content("validate#evaluator").run()
    print((Path(args.out) / "metrics.csv").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
