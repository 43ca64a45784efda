"""Benchmark: the nodule bundle's former hand-written CPU 3D-convolution backward against PyTorch's own, in one run.

``scripts/cpu_conv.py`` (``faster_cpu_backward``) of ``lung_nodule_ct_segmentation`` (up to 0.3.3)
replaced the backward of every 3D convolution by a weight gradient computed as a forward convolution.
This script times, in the same process, interleaved (A, B, B, A, ...) so that a noisy shared machine hits
both alike, the best of ``--repeats`` of:

* ``conv3d``: forward + backward of one ``Conv3d(16, 16, 3, padding=1)`` on ``(4, 16, 32, 32, 32)``
  (the shape of cpu_conv's docstring);
* ``convtranspose3d``: the same for ``ConvTranspose3d(16, 16, 3, stride=2, padding=1, output_padding=1)``
  on ``(4, 16, 16, 16, 16)``;
* ``train_step``: one training step of the bundle's network (``train.json``'s ``network_def``: deep
  supervision AttentionUnet, channels 8..64) on a batch of ``num_samples`` = 4 patches of 32^3 with the
  bundle's ``DeepSupervisionLoss(DiceFocalLoss)`` and AdamW.

and prints the best seconds of each, the ratio ``cpu_conv / pytorch`` of the bests and the median of the
per-repeat ratios (above 1: PyTorch's own is faster). It measured no gain (docs/experiments/
lung_nodule_ct_segmentation/README.md), so the module was removed in 0.3.4; to rerun, take it from git:

    git show 73183c4:bundles/lung_nodule_ct_segmentation/scripts/cpu_conv.py > /tmp/cpu_conv.py
    python benchmarks/bench_cpu_conv.py --cpu-conv /tmp/cpu_conv.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BUNDLE = HERE.parent / "bundles" / "lung_nodule_ct_segmentation"


def load_cpu_conv(path: Path):
    """Import the hand-written backward module from a file (it has no dependency on the rest of the bundle)."""
    spec = importlib.util.spec_from_file_location("bench_cpu_conv_module", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def layer_step(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward and backward of one layer (input and weight gradients)."""
    xi = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(xi).sum().backward()


def make_train_step(fast_backward):
    """Two closures (pytorch, cpu_conv) doing one training step of the bundle's network, same weights and data."""
    sys.path.insert(0, str(BUNDLE))
    from monai.losses import DeepSupervisionLoss, DiceFocalLoss
    from scripts.network import DeepSupervisionAttentionUnet

    torch.manual_seed(0)
    net = DeepSupervisionAttentionUnet(3, 1, 1, channels=(8, 16, 32, 64), strides=(2, 2, 2), deep_supr_num=2).train()
    nets = {"pytorch": net, "cpu_conv": fast_backward(copy.deepcopy(net))}
    dice_focal = DiceFocalLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    loss_fn = DeepSupervisionLoss(dice_focal, weight_mode="exp")
    x = torch.rand(4, 1, 32, 32, 32)
    y = (torch.rand(4, 1, 32, 32, 32) > 0.95).float()
    steps = {}
    for name, n in nets.items():
        opt = torch.optim.AdamW(n.parameters(), lr=1e-4)

        def step(n=n, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(n(x), y).backward()
            opt.step()

        steps[name] = step
    return steps


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats of each case (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--cpu-conv", type=Path, required=True, help="a copy of the removed cpu_conv.py (docstring)")
    args = ap.parse_args()
    if not args.cpu_conv.is_file():
        sys.exit(f"{args.cpu_conv}: no such file (see the docstring for how to get the removed module from git)")
    torch.set_num_threads(args.threads)
    fast = load_cpu_conv(args.cpu_conv).faster_cpu_backward
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1)
    convt = torch.nn.ConvTranspose3d(16, 16, 3, stride=2, padding=1, output_padding=1)
    x, xt = torch.randn(4, 16, 32, 32, 32), torch.randn(4, 16, 16, 16, 16)
    cases = {
        "conv3d": {
            "pytorch": partial(layer_step, conv, x),
            "cpu_conv": partial(layer_step, fast(copy.deepcopy(conv)), x),
        },
        "convtranspose3d": {
            "pytorch": partial(layer_step, convt, xt),
            "cpu_conv": partial(layer_step, fast(copy.deepcopy(convt)), xt),
        },
        "train_step": make_train_step(fast),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats} interleaved repeats", flush=True)
    print(f"{'case':16s}{'pytorch s':>11s}{'cpu_conv s':>12s}{'ratio of bests':>16s}{'median paired ratio':>21s}")
    for case, fns in cases.items():
        for fn in fns.values():  # warm-up (oneDNN primitive creation, allocator)
            fn(), fn()
        times = {name: [] for name in fns}
        for r in range(args.repeats):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in order:
                times[name].append(timed(fns[name]))
        best = {name: min(t) for name, t in times.items()}
        paired = sorted(c / p for c, p in zip(times["cpu_conv"], times["pytorch"]))
        median = paired[len(paired) // 2]
        ratio = best["cpu_conv"] / best["pytorch"]
        print(f"{case:16s}{best['pytorch']:11.4f}{best['cpu_conv']:12.4f}{ratio:16.2f}{median:21.2f}", flush=True)


if __name__ == "__main__":
    main()
