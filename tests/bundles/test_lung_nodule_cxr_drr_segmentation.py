"""Tests of the lung_nodule_cxr_drr_segmentation bundle: X-ray + DRR fusion nodule segmenter.

The DRR sets used here are tiny synthetic 2D pairs written in the DRR data contract (smooth
anatomy-like backgrounds, bright disks as nodules, a DRR-like and an X-ray-like rendering of the same
field); the shipped model is trained outside the tests (docs/README.md).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from tests.bundles.conftest import (
    BUNDLES,
    assert_ddp_released_before_exit,
    bundle_scripts,
    ddp_release_probe,
    run_bundle,
)

NAME = "lung_nodule_cxr_drr_segmentation"
BUNDLE = BUNDLES / NAME
SIZE = 64  # pixels of the synthetic pairs and of the network grid in the tests


# ----------------------------------------------------------------------------------------------
# synthetic DRR sets in the data contract
# ----------------------------------------------------------------------------------------------


def _pair(rng: np.random.Generator, size: int, radius: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (drr, xray, mask), float32 [0, 1] and uint8, (H, W); ``radius`` None: no nodule."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    anatomy = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 10)
    anatomy = (anatomy - anatomy.min()) / (np.ptp(anatomy) + 1e-6)
    ribs = 0.15 * (np.sin(yy / size * 2 * np.pi * rng.uniform(4, 6) + rng.uniform(0, 6)) > 0.7)
    body = 0.4 * anatomy + ribs
    mask = np.zeros((size, size), np.uint8)
    if radius is not None:
        cy, cx = rng.uniform(radius + 2, size - radius - 2, size=2)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).astype(np.uint8)
    drr = body + 0.5 * mask
    xray = ndimage.gaussian_filter(body**1.3 + 0.35 * mask, 0.8) + rng.normal(0, 0.03, (size, size))
    norm = lambda a: ((a - a.min()) / (np.ptp(a) + 1e-6)).astype(np.float32)  # noqa: E731
    return norm(drr), norm(xray), mask


def _write(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)  # (H, W) -> size (W, H), as the contract says
    img.SetSpacing((1.0, 1.0))
    sitk.WriteImage(img, str(path))


def make_drr_set(root: Path, n: int, folds: list[int], seed: int = 0, size: int = SIZE, negatives: int = 1) -> Path:
    """Write ``n`` synthetic pairs (the last ``negatives`` without a nodule) with the given folds (cycled)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        radius = None if i >= n - negatives else float(rng.uniform(3, 8))
        drr, xray, mask = _pair(rng, size, radius)
        sample = f"case{i:03d}_p0"
        for sub, arr in (
            ("images/drr", drr),
            ("images/xray", xray),
            ("labels/nodules", mask),
            ("labels/lungs", np.ones_like(mask)),
        ):
            _write(arr, root / sub / f"{sample}.nii.gz")
        items.append(
            {
                "xray": f"images/xray/{sample}.nii.gz",
                "drr": f"images/drr/{sample}.nii.gz",
                "label": f"labels/nodules/{sample}.nii.gz",
                "lung": f"labels/lungs/{sample}.nii.gz",
                "fold": folds[i % len(folds)],
                "case_id": f"case{i:03d}",
                "patient_id": f"case{i:03d}",
                "pose": 0,
                "max_diameter_mm": None if radius is None else 2 * radius,
            }
        )
    (root / "datalist.json").write_text(json.dumps({"training": items}, indent=1))
    return root


SMALL = {"image_size": SIZE, "num_workers": 0, "batch_size": 4}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two threads per process are much slower than one on a loaded 2-core machine


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _group(metrics_csv: Path, group: str) -> dict:
    return next(r for r in _read_csv(metrics_csv) if r["group"] == group)


def _torchvision_resnet50_state_dict(num_classes: int = 18, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's ResNet-50 key names and shapes (written out here, not taken from the bundle)."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.bias"] = torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    sd["conv1.weight"] = torch.randn(64, 1, 7, 7, generator=g)
    bn("bn1", 64)
    in_c = 64
    for i, (blocks, planes) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512]), start=1):
        for j in range(blocks):
            p = f"layer{i}.{j}"
            sd[f"{p}.conv1.weight"] = torch.randn(planes, in_c, 1, 1, generator=g)
            bn(f"{p}.bn1", planes)
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=g)
            bn(f"{p}.bn2", planes)
            sd[f"{p}.conv3.weight"] = torch.randn(planes * 4, planes, 1, 1, generator=g)
            bn(f"{p}.bn3", planes * 4)
            if j == 0:
                sd[f"{p}.downsample.0.weight"] = torch.randn(planes * 4, in_c, 1, 1, generator=g)
                bn(f"{p}.downsample.1", planes * 4)
            in_c = planes * 4
    sd["fc.weight"] = torch.randn(num_classes, 2048, generator=g)
    sd["fc.bias"] = torch.randn(num_classes, generator=g)
    return {prefix + k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# network, key mapping, loss, phases
# ----------------------------------------------------------------------------------------------


def test_xrv_key_mapping_loads_torchvision_named_resnet50(tmp_path):
    """A torchxrayvision-style state dict (torchvision names, 'model.' prefix) fills the backbone exactly and row 11 of fc becomes the frozen prior head."""
    src = _torchvision_resnet50_state_dict()
    path = tmp_path / "xrv_resnet50.pt"
    torch.save(src, path)
    with bundle_scripts(BUNDLE) as scripts:
        net = scripts.network.CxrDrrFusionNet(backbone_width=64, attention_channels=(4,) * 5, decoder_channels=(8,) * 6)
        scripts.network.load_xrv_weights(net, path)  # what xrv_weights=<path> does at construction
        own = net.state_dict()
        for key, value in src.items():
            k = key[len("model.") :]
            if k.startswith("fc."):
                continue
            assert torch.equal(own["backbone." + k], value), k
        assert torch.equal(own["prior.weight"].flatten(), src["model.fc.weight"][11])
        assert torch.equal(own["prior.bias"], src["model.fc.bias"][11:12])
        assert not any(p.requires_grad for p in net.prior.parameters())
        groups = scripts.network.param_groups(net, lr=1e-3, backbone_lr=1e-4)
        assert all(id(p) not in {id(q) for q in net.prior.parameters()} for g in groups for p in g["params"])
        # a narrower backbone cannot take ResNet-50 weights: clear message, not a deep traceback
        with pytest.raises(ValueError, match="backbone_width 64"):
            scripts.network.CxrDrrFusionNet(
                backbone_width=8, attention_channels=(4,) * 5, decoder_channels=(8,) * 6, xrv_weights=str(path)
            )
        # a pickled module instead of a state dict is refused (weights_only=True)
        torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
        with pytest.raises(ValueError, match="state dict"):
            scripts.network.load_xrv_weights(net, tmp_path / "module.pt")


def test_network_fuses_drr_attention_at_each_scale():
    """Output is (B, 5, H, W): nodule logit plus attention at 1/4..1/32 (constant on 4..32-pixel blocks); the DRR changes the mask only through fusion (alpha)."""
    with bundle_scripts(BUNDLE) as scripts:
        torch.manual_seed(0)
        net = scripts.network.CxrDrrFusionNet(
            backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8)
        ).eval()
        x = torch.randn(2, 2, 64, 64)
        with torch.no_grad():
            y = net(x)
            assert y.shape == (2, 5, 64, 64)
            for k, block in enumerate([4, 8, 16, 32], start=1):
                a = y[:, k].reshape(2, 64 // block, block, 64 // block, block)
                assert torch.allclose(a, a[:, :, :1, :, :1].expand_as(a)), block
            x2 = x.clone()
            x2[:, 1] = torch.randn(2, 64, 64)
            assert not torch.equal(net(x2)[:, 0], y[:, 0])  # the DRR steers the segmentation
            net.fusion["alpha"].data.zero_()
            assert torch.equal(net(x2)[:, 0], net(x)[:, 0])  # ... only through f * (1 + alpha * a)


def test_drr_skips_give_the_decoder_the_drr_without_the_gates():
    """drr_skips=True: the DRR reaches the mask also when the gates are off (alpha 0), as a change local to the DRR; same output shape, TorchScript-exportable."""
    with bundle_scripts(BUNDLE) as scripts:
        torch.manual_seed(0)
        net = scripts.network.CxrDrrFusionNet(
            backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8), drr_skips=True
        ).eval()
        net.fusion["alpha"].data.zero_()
        x = torch.randn(1, 2, 64, 64)
        x2 = x.clone()
        x2[:, 1, 40:44, 40:44] += 3.0  # a small bright spot in the DRR only
        with torch.no_grad():
            y, y2 = net(x), net(x2)
            assert y.shape == (1, 5, 64, 64)
            diff = (y2[0, 0] - y[0, 0]).abs()
            assert diff.max() > 0  # the DRR steers the mask with the gates off
            assert diff[36:48, 36:48].max() == diff.max()  # strongest where the DRR changed (full-resolution skip)
            ts = torch.jit.script(net)
            assert torch.allclose(ts(x2), y2, atol=1e-5)
        # the same layout without the skips: alpha 0 cuts the DRR off the mask (see the test above)
        plain = scripts.network.CxrDrrFusionNet(
            backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8)
        )
        assert sum(p.numel() for p in net.decoder.parameters()) > sum(p.numel() for p in plain.decoder.parameters())


def test_drr_skips_flag_from_the_command_line_means_what_it_says():
    """``--drr_skips false`` arrives as the string 'false': the network must be built without DRR skips; a typo is refused by name."""
    from monai.bundle import ConfigParser

    with bundle_scripts(BUNDLE):
        built = {}
        for given in ["false", "true", "nope"]:
            parser = ConfigParser()
            parser.read_config(str(BUNDLES / BUNDLE / "configs" / "inference.json"))
            parser["drr_skips"] = given
            if given == "nope":
                with pytest.raises(RuntimeError) as err:  # MONAI wraps it; the cause names the key
                    parser.get_parsed_content("network_def")
                assert "drr_skips: expected true or false, got 'nope'" in str(err.value.__cause__)
            else:
                built[given] = parser.get_parsed_content("network_def")
        assert built["false"].drr_skips is False and built["true"].drr_skips is True
        n_false, n_true = (sum(p.numel() for p in built[k].parameters()) for k in ("false", "true"))
        assert n_true > n_false  # the skip-fed decoder has wider input convolutions


def test_init_checkpoint_fine_tunes_from_saved_weights_and_names_bad_files(tmp_path):
    """init_checkpoint: a saved state dict (plain or under "model") is loaded exactly; a missing, non-weights or mismatched file is named in the error."""
    with bundle_scripts(BUNDLE) as scripts:
        kw = dict(backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8))
        torch.manual_seed(1)
        src = scripts.network.CxrDrrFusionNet(**kw)
        torch.save({"model": src.state_dict()}, tmp_path / "ckpt.pt")
        torch.manual_seed(2)
        dst = scripts.network.CxrDrrFusionNet(**kw)
        assert not torch.equal(dst.decoder["head"].weight, src.decoder["head"].weight)
        scripts.network.load_init_checkpoint(dst, str(tmp_path / "ckpt.pt"))
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
        assert scripts.network.load_init_checkpoint(dst, "") is dst
        with pytest.raises(FileNotFoundError, match="nope.pt"):
            scripts.network.load_init_checkpoint(dst, str(tmp_path / "nope.pt"))
        torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
        with pytest.raises(ValueError, match="module.pt.*weights-only"):
            scripts.network.load_init_checkpoint(dst, str(tmp_path / "module.pt"))
        # a checkpoint with DRR skips does not fit a network without them
        torch.save(scripts.network.CxrDrrFusionNet(**kw, drr_skips=True).state_dict(), tmp_path / "skips.pt")
        with pytest.raises(ValueError, match="skips.pt does not fit network_def"):
            scripts.network.load_init_checkpoint(scripts.network.CxrDrrFusionNet(**kw), str(tmp_path / "skips.pt"))
        wide = dict(kw, decoder_channels=(32, 16, 8, 8, 8, 8))
        with pytest.raises(
            ValueError, match="ckpt.pt does not fit network_def"
        ):  # widening adds inputs, never other sizes
            scripts.network.load_init_checkpoint(
                scripts.network.CxrDrrFusionNet(**wide, drr_skips=True), str(tmp_path / "ckpt.pt")
            )


def test_init_checkpoint_exclude_keeps_the_fresh_attention_path(tmp_path):
    """init_exclude: the excluded modules keep the new network's own initialization (also with new slab inputs), the rest is the checkpoint's; a prefix matching nothing is refused."""
    with bundle_scripts(BUNDLE) as scripts:
        kw = dict(backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8))
        torch.manual_seed(4)
        src = scripts.network.CxrDrrFusionNet(**kw)
        torch.save(src.state_dict(), tmp_path / "plain.pt")
        torch.manual_seed(5)
        dst = scripts.network.CxrDrrFusionNet(**kw, in_channels=5)  # three slab channels: the stem is wider
        fresh = {k: v.clone() for k, v in dst.state_dict().items()}
        scripts.network.load_init_checkpoint(dst, str(tmp_path / "plain.pt"), ["attention."])
        got, ckpt = dst.state_dict(), src.state_dict()
        att = [k for k in got if k.startswith("attention.")]
        assert att and all(torch.equal(got[k], fresh[k]) for k in att)
        assert got["attention.stem.0.weight"][:, 1:].abs().sum() > 0  # slab inputs weighted from the start, not zero
        rest = [k for k in got if not k.startswith("attention.")]
        assert all(torch.equal(got[k], ckpt[k]) for k in rest)
        assert not torch.equal(fresh["decoder.head.weight"], ckpt["decoder.head.weight"])  # so loading the rest is seen
        dst2 = scripts.network.CxrDrrFusionNet(**kw, in_channels=5)
        scripts.network.load_init_checkpoint(
            dst2, str(tmp_path / "plain.pt"), "attention."
        )  # one prefix as a plain string
        assert torch.equal(dst2.state_dict()["decoder.head.weight"], ckpt["decoder.head.weight"])
        assert not torch.equal(dst2.state_dict()["attention.stem.0.weight"][:, :1], ckpt["attention.stem.0.weight"])
        with pytest.raises(ValueError, match="'atention.' matches no weight"):
            scripts.network.load_init_checkpoint(dst, str(tmp_path / "plain.pt"), ["atention."])


def test_init_checkpoint_without_drr_skips_widens_into_a_skip_network(tmp_path):
    """A checkpoint without drr_skips loads into a drr_skips network: same outputs at the start (new inputs zero), and training moves the new weights so the DRR reaches the decoder."""
    with bundle_scripts(BUNDLE) as scripts:
        kw = dict(backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8))
        torch.manual_seed(3)
        src = scripts.network.CxrDrrFusionNet(**kw).eval()
        torch.save(src.state_dict(), tmp_path / "plain.pt")
        dst = scripts.network.CxrDrrFusionNet(**kw, drr_skips=True)
        scripts.network.load_init_checkpoint(dst, str(tmp_path / "plain.pt"))
        dst.eval()
        x = torch.randn(2, 2, 64, 64)
        with torch.no_grad():
            assert torch.allclose(dst(x), src(x), atol=1e-6)
        widened = [
            k for k in scripts.network.WIDENABLE_INPUTS if src.state_dict()[k].shape != dst.state_dict()[k].shape
        ]
        assert len(widened) == 6 and all(
            k.startswith("decoder.") for k in widened
        )  # the attention path keeps its input
        for key in widened:  # old inputs copied, the DRR's new ones zero
            old, new = src.state_dict()[key], dst.state_dict()[key]
            assert new.shape[1] > old.shape[1]
            assert torch.equal(new[:, : old.shape[1]], old) and not new[:, old.shape[1] :].any()
        dst.train()
        opt = torch.optim.SGD(dst.parameters(), lr=0.1)
        dst(x)[:, 0].mean().backward()
        opt.step()
        head_in = dst.state_dict()["decoder.up1.conv.0.0.weight"]
        assert head_in[:, -2:].abs().sum() > 0  # the full-resolution X-ray/DRR inputs now carry weight


def test_loss_prefers_the_right_mask_and_allows_empty_masks():
    """Tversky + focal Tversky + weighted BCE + attention BCE: lower for the right mask, finite on an empty mask, weights switch terms off."""
    with bundle_scripts(BUNDLE) as scripts:
        loss = scripts.losses.FusionSegLoss()
        target = torch.zeros(2, 1, 32, 32)
        target[:, :, 10:16, 10:16] = 1
        good = (target * 20 - 10).repeat(1, 5, 1, 1)
        bad = torch.roll(good, shifts=12, dims=-1)
        assert loss(good, target) < 0.2 * loss(bad, target)
        empty = torch.zeros_like(target)
        assert torch.isfinite(loss(bad, empty)) and loss(-10 * torch.ones_like(good), empty) < loss(bad, empty)
        loss.seg_scale, loss.attention_weight = 0.0, 1.0
        only_att = good.clone()
        only_att[:, 0] = -good[:, 0]  # wrong mask channel, right attention: no penalty in the warm-up
        assert loss(only_att, target) < 0.05


def test_loss_of_half_precision_logits_is_computed_in_float32():
    """Under AMP the network hands float16 logits to the loss: it must give the float32 value and a finite gradient, not fail or round."""
    with bundle_scripts(BUNDLE) as scripts:
        loss = scripts.losses.FusionSegLoss()
        g = torch.Generator().manual_seed(0)
        target = (torch.rand(4, 1, 64, 64, generator=g) > 0.97).float()
        logits = (torch.randn(4, 5, 64, 64, generator=g) * 3 - 4).half()
        half_in = logits.clone().requires_grad_(True)
        value = loss(half_in, target)
        value.backward()
        reference = loss(logits.float(), target)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert torch.allclose(value, reference, rtol=1e-6, atol=1e-6)
        assert half_in.grad is not None and torch.isfinite(half_in.grad.float()).all() and half_in.grad.abs().sum() > 0


def test_phases_handler_freezes_groups_and_switches_loss_weights():
    """The phase handler freezes / unfreezes parameter groups at the configured epochs (lr 0 for frozen groups) and sets the loss weights."""
    from ignite.engine import Engine, Events

    with bundle_scripts(BUNDLE) as scripts:
        net = scripts.network.CxrDrrFusionNet(
            backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8)
        )
        opt = torch.optim.AdamW(scripts.network.param_groups(net, lr=1e-3, backbone_lr=1e-4))
        loss = scripts.losses.FusionSegLoss()
        phases = [
            {"name": "warmup", "start_epoch": 1, "trainable": ["attention"], "seg_scale": 0.0, "attention_weight": 1.0},
            {
                "name": "joint",
                "start_epoch": 2,
                "trainable": ["attention", "fusion", "decoder"],
                "seg_scale": 1.0,
                "attention_weight": 0.5,
            },
            {
                "name": "finetune",
                "start_epoch": 4,
                "trainable": ["attention", "fusion", "decoder", "backbone.layer4"],
                "seg_scale": 1.0,
                "attention_weight": 0.1,
            },
        ]
        handler = scripts.phases.TrainingPhases(net, opt, loss, phases)
        engine = Engine(lambda e, b: None)
        handler.attach(engine)
        seen = {}

        @engine.on(Events.EPOCH_COMPLETED)
        def record(e):
            lrs = {g["name"]: g["lr"] for g in opt.param_groups}
            seen[e.state.epoch] = (
                lrs,
                loss.seg_scale,
                loss.attention_weight,
                net.backbone.layer4[0].conv1.weight.requires_grad,
                net.decoder["head"].weight.requires_grad,
                net.attention.stem[0].weight.requires_grad,
                net.backbone.layer1[0].conv1.weight.requires_grad,
            )

        engine.run([0], max_epochs=4)
        lrs, seg, att, l4, dec, attn, l1 = seen[1]
        assert (seg, att, l4, dec, attn, l1) == (0.0, 1.0, False, False, True, False)
        assert lrs["attention"] == 1e-3 and lrs["decoder"] == 0.0 and lrs["backbone.layer4"] == 0.0
        lrs, seg, att, l4, dec, attn, l1 = seen[3]
        assert (seg, att, l4, dec) == (1.0, 0.5, False, True) and lrs["decoder"] == 1e-3
        lrs, seg, att, l4, dec, attn, l1 = seen[4]
        assert (att, l4, l1) == (0.1, True, False)
        assert lrs["backbone.layer4"] == 1e-4 and lrs["backbone.layer1"] == 0.0 and lrs["backbone.stem"] == 0.0


def test_lr_schedule_decays_training_groups_across_phases():
    """lr_schedule cosine / poly: the training groups' rates follow base_lr times the decay at every
    iteration, across a phase switch, frozen groups stay at 0, and an unknown schedule is refused."""
    import math

    from ignite.engine import Engine, Events

    with bundle_scripts(BUNDLE) as scripts:
        for schedule, expected in (
            ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t))),
            ("poly", lambda t: (1 - t) ** 0.9),
        ):
            net = scripts.network.CxrDrrFusionNet(
                backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8)
            )
            opt = torch.optim.AdamW(scripts.network.param_groups(net, lr=1e-3, backbone_lr=1e-4))
            phases = [
                {"name": "warmup", "start_epoch": 1, "trainable": ["attention"]},
                {"name": "joint", "start_epoch": 2, "trainable": ["attention", "decoder", "backbone.layer4"]},
            ]
            handler = scripts.phases.TrainingPhases(
                net, opt, scripts.losses.FusionSegLoss(), phases, lr_schedule=schedule
            )
            engine = Engine(lambda e, b: {g["name"]: g["lr"] for g in opt.param_groups})
            handler.attach(engine)
            seen = []
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(dict(e.state.output)))
            engine.run(list(range(5)), max_epochs=4)  # 20 iterations
            assert len(seen) == 20
            for i, lrs in enumerate(seen):
                f = expected(i / 20)
                assert math.isclose(lrs["attention"], 1e-3 * f, rel_tol=1e-9, abs_tol=1e-15)
                assert lrs["backbone.layer1"] == 0.0 and lrs["fusion"] == 0.0
                if i < 5:  # first epoch: decoder and layer4 frozen
                    assert lrs["decoder"] == 0.0 and lrs["backbone.layer4"] == 0.0
                else:
                    assert math.isclose(lrs["decoder"], 1e-3 * f, rel_tol=1e-9, abs_tol=1e-15)
                    assert math.isclose(lrs["backbone.layer4"], 1e-4 * f, rel_tol=1e-9, abs_tol=1e-15)
            assert seen[-1]["attention"] < 0.1 * seen[0]["attention"]  # decayed to near zero by the end
        with pytest.raises(ValueError, match="lr_schedule"):
            scripts.phases.TrainingPhases(net, opt, scripts.losses.FusionSegLoss(), phases, lr_schedule="step")


def test_patch_sampling_crops_nodule_centred_patches_for_training(tmp_path):
    """train_patch_size / train_patches_per_image / train_positive_fraction: the training set yields that many patches per pair, of that size, all on the nodule at fraction 1; validation keeps whole images."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    drr_set = make_drr_set(tmp_path / "set", 6, folds=[1, 1, 0], seed=3, negatives=0)
    with bundle_scripts(BUNDLE):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser.update(
            {
                "dataset_dir": str(drr_set),
                "image_size": SIZE,
                "num_workers": 0,
                "train_patch_size": 32,
                "train_patches_per_image": 3,
                "train_positive_fraction": 1.0,
            }
        )
        set_determinism(seed=0)
        train_ds = parser.get_parsed_content("train#dataset")
        val_ds = parser.get_parsed_content("validate#dataset")
        samples = [train_ds[i] for i in range(len(train_ds))]
        assert len(train_ds) == 4 and all(isinstance(s, list) and len(s) == 3 for s in samples)
        patches = [p for s in samples for p in s]
        assert all(tuple(p["image"].shape) == (2, 32, 32) and tuple(p["label"].shape) == (1, 32, 32) for p in patches)
        assert all(float(p["label"].sum()) > 0 for p in patches)  # every patch is centred on nodule pixels
        assert tuple(val_ds[0]["image"].shape) == (2, SIZE, SIZE)
        parser["train_positive_fraction"] = 0.0  # all patches centred on background: some miss the nodule
        set_determinism(seed=0)
        neg = [p for i in range(4) for p in parser.get_parsed_content("train#dataset", lazy=False)[i]]
        assert any(float(p["label"].sum()) == 0 for p in neg)


def test_frozen_groups_keep_their_batchnorm_statistics():
    """In training mode, BatchNorm layers of frozen groups keep their running statistics (pretrained
    stem/layer1 must not drift); trainable groups' statistics update, and unfreezing lets them update again."""
    with bundle_scripts(BUNDLE) as scripts:
        net = scripts.network.CxrDrrFusionNet(
            backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8)
        )
        opt = torch.optim.AdamW(scripts.network.param_groups(net, lr=1e-3, backbone_lr=1e-4))
        phases = [
            {"name": "joint", "start_epoch": 1, "trainable": ["attention", "fusion", "decoder", "backbone.layer4"]},
            {"name": "all", "start_epoch": 2, "trainable": ["attention", "fusion", "decoder", "backbone"]},
        ]
        handler = scripts.phases.TrainingPhases(net, opt, scripts.losses.FusionSegLoss(), phases)
        frozen_bn, trained_bn = net.backbone.layer1[0].bn1, net.backbone.layer4[0].bn1
        x = torch.randn(2, 2, 64, 64) * 3 + 2

        def step():
            net.train()  # what SupervisedTrainer does every iteration
            before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
            with torch.no_grad():
                net(x)
            return not torch.equal(before[0], frozen_bn.running_mean), not torch.equal(
                before[1], trained_bn.running_mean
            )

        handler.apply(handler.phase_for(1))
        assert step() == (False, True)
        assert not net.backbone.layer1[0].conv1.weight.requires_grad
        handler.apply(handler.phase_for(2))
        assert step() == (True, True)
        net.eval()
        assert not frozen_bn.training


# ----------------------------------------------------------------------------------------------
# input formats and bad input
# ----------------------------------------------------------------------------------------------


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str, series_uid: str | None = None) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def test_radiograph_formats_and_bad_input_are_handled(tmp_path):
    """PNG 8/16-bit and gray-as-RGB, DICOM MONOCHROME1 (inverted) and 2D NIfTI read alike; colour, mismatched fields and constant images are refused naming the file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = ndimage.gaussian_filter(rng.random((48, 64)), 3)
    base = (base - base.min()) / np.ptp(base)
    u8, u16 = np.round(base * 255).astype(np.uint8), np.round(base * 4095).astype(np.uint16)
    Image.fromarray(u8).save(tmp_path / "gray8.png")
    Image.fromarray(u16).save(tmp_path / "gray16.png")
    Image.fromarray(np.stack([u8] * 3, -1)).save(tmp_path / "gray_rgb.png")
    colour = np.stack([u8, 255 - u8, u8], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    _write_dicom(tmp_path / "mono2.dcm", u16, "MONOCHROME2")
    _write_dicom(tmp_path / "mono1.dcm", 4095 - u16, "MONOCHROME1")
    _write(base.astype(np.float32), tmp_path / "image.nii.gz")
    Image.fromarray(np.full((48, 64), 7, np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(u8[:, :40]).save(tmp_path / "narrow.png")
    Image.fromarray(np.kron(u8, np.ones((2, 2), np.uint8))).save(tmp_path / "double.png")

    def unit(a):
        a = np.asarray(a, np.float64)
        return (a - a.min()) / np.ptp(a)

    with bundle_scripts(BUNDLE) as scripts:
        io = scripts.io
        for name in ["gray8.png", "gray16.png", "gray_rgb.png", "mono2.dcm", "mono1.dcm", "image.nii.gz"]:
            arr, info = io.read_radiograph(tmp_path / name)
            assert arr.shape == (48, 64), name
            assert np.abs(unit(arr) - base).max() < 0.01, name  # same picture, bright = bright, rows = rows
        assert io.read_radiograph(tmp_path / "gray16.png")[0].max() > 255  # 16 bits kept, not clipped to 8
        assert io.read_radiograph(tmp_path / "mono1.dcm")[1]["spacing"] == (0.5, 0.5)
        with pytest.raises(io.InputError, match=r"colour\.png.*colour"):
            io.read_radiograph(tmp_path / "colour.png")
        with pytest.raises(io.InputError, match=r"blank\.png.*constant"):
            io.LoadRadiographd(["xray"])({"xray": str(tmp_path / "blank.png")})
        with pytest.raises(io.InputError, match=r"missing\.png: no such file"):
            io.read_radiograph(tmp_path / "missing.png")
        load = io.LoadRadiographd(["xray", "drr"])
        check = io.CheckPaird(["xray", "drr"], label_key="label")
        with pytest.raises(io.InputError, match=r"narrow\.png.*aspect ratio.*gray8\.png"):
            check(load({"xray": str(tmp_path / "gray8.png"), "drr": str(tmp_path / "narrow.png")}))
        ok = check(
            load({"xray": str(tmp_path / "gray8.png"), "drr": str(tmp_path / "double.png")})
        )  # same field, twice the pixels
        assert ok["drr"].shape == (1, 96, 128) and ok["xray"].shape == (1, 48, 64)
        mask = io.LoadRadiographd("label", binary=True)({"label": str(tmp_path / "gray8.png")})["label"]
        assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------------------------
# the inference inputs: files, folders, lists, formats, DRR partners
# ----------------------------------------------------------------------------------------------


def _picture(size: int = 48) -> np.ndarray:
    """A smooth (H, W) test picture with integer values 0..4095 (so every format stores it exactly)."""
    base = ndimage.gaussian_filter(np.random.default_rng(5).random((size, size + 8)), 3)
    return np.round((base - base.min()) / np.ptp(base) * 4095).astype(np.uint16)


def _write_formats(folder: Path, arr: np.ndarray) -> list[str]:
    """The same X-ray as a.nii.gz, b.mha, c.nrrd, a DICOM file d.dcm and a DICOM folder e/; returns their input ids."""
    for name in ("a.nii.gz", "b.mha", "c.nrrd"):
        _write(arr.astype(np.float32), folder / name)
    _write_dicom(folder / "d.dcm", arr, "MONOCHROME2")
    _write_dicom(folder / "e" / "IM0001", arr, "MONOCHROME2")  # a DICOM file named without a suffix
    return ["a", "b", "c", "d", "e"]


def test_expand_inputs_reads_files_folders_lists_and_names_each_input(tmp_path):
    """Files, list strings, folders (images, DICOM by content, series subfolders) expand and are named as documented."""
    arr = _picture()
    xr = tmp_path / "xr"
    ids = _write_formats(xr, arr)
    _write(arr, xr / "f.mhd")  # writes f.mhd and its f.raw
    _write_dicom(xr / "1.2.840.99", arr, "MONOCHROME2")  # a DICOM file named by a UID
    (xr / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    for i in range(2):
        _write_dicom(tmp_path / "two_series" / f"{i}.dcm", arr, "MONOCHROME2")
        _write_dicom(tmp_path / "one_series" / f"{i}.dcm", arr, "MONOCHROME2", series_uid="1.2.826.0.1.3680043.2.1")
    with bundle_scripts(BUNDLE) as scripts:
        inp = scripts.inputs
        found = inp.expand_inputs(str(xr))
        assert [Path(f).name for f in found] == ["1.2.840.99", "a.nii.gz", "b.mha", "c.nrrd", "d.dcm", "e", "f.mhd"]
        assert [inp.input_id(f) for f in found] == ["1.2.840.99", *ids, "f"]
        for f in found:
            assert np.array_equal(scripts.io.read_radiograph(f)[0], arr.astype(np.float32)), f  # same picture
        assert inp.expand_inputs(str(xr / "e")) == [str(xr / "e")]
        two = [str(xr / "b.mha"), str(xr / "a.nii.gz")]
        assert inp.expand_inputs(f"['{two[0]}', '{two[1]}']") == two
        assert inp.expand_inputs([str(xr / "a.nii.gz"), str(tmp_path / "gone.png")])[1] == str(tmp_path / "gone.png")
        assert len(inp.expand_inputs(str(tmp_path / "two_series"))) == 2
        assert inp.expand_inputs(str(tmp_path / "one_series")) == [str(tmp_path / "one_series")]
        with pytest.raises(inp.InputError, match=r"one_series: DICOM folder of 2 images"):
            scripts.io.read_radiograph(tmp_path / "one_series")
        with pytest.raises(inp.InputError, match=r"gone\.png: no such file or folder"):
            inp.expand_inputs(str(tmp_path / "gone.png"))
        with pytest.raises(inp.InputError, match=r"empty: folder holds no readable image"):
            inp.expand_inputs(str(tmp_path / "empty"))


def test_each_xray_finds_its_drr_beside_it_in_a_folder_or_by_position_and_bad_pairs_are_refused(tmp_path, caplog):
    """A DRR is found beside its X-ray, by name in a folder or by position; X-rays without one are refused by name."""
    arr = _picture().astype(np.float32)
    images = tmp_path / "set" / "images"
    for n in ("p1", "p2", "p3"):
        _write(arr, images / "xray" / f"{n}.nii.gz")
    _write(arr, images / "xray" / "p1.mha")  # the same name as p1.nii.gz
    for n in ("p1", "p2"):
        _write(arr, images / "drr" / f"{n}.nii.gz")
    _write(arr, tmp_path / "drrs" / "p3.mha")
    from PIL import Image

    Image.fromarray(np.full((48, 56), 9, np.uint8)).save(tmp_path / "blank.png")
    with bundle_scripts(BUNDLE) as scripts:
        io = scripts.io
        items, failed = io.pair_inputs(str(images / "xray"))
        x, d = images / "xray", images / "drr"
        pairs = [(Path(i["xray"]).name, Path(i["drr"])) for i in items]
        assert pairs == [("p1.mha", d / "p1.nii.gz"), ("p2.nii.gz", d / "p2.nii.gz")]
        assert failed == {
            str(x / "p1.nii.gz"): f"its outputs would be named p1, as those of {x / 'p1.mha'}; rename one",
            str(x / "p3.nii.gz"): f"no drr named p3 in {d} (beside the X-ray's folder, as data_prep drr writes them; "
            "or give --drr_path)",
        }
        items, failed = io.pair_inputs(str(x / "p3.nii.gz"), str(tmp_path / "drrs"))
        assert items == [{"xray": str(x / "p3.nii.gz"), "drr": str(tmp_path / "drrs" / "p3.mha")}] and not failed
        pair = [str(images / "xray" / "p2.nii.gz"), str(tmp_path / "blank.png")]
        drrs = [str(images / "drr" / "p1.nii.gz"), str(images / "drr" / "p2.nii.gz")]
        items, failed = io.pair_inputs(pair, drrs)
        assert [i["drr"] for i in items] == drrs and not failed
        with pytest.raises(io.InputError, match=r"--drr_path .*p1\.nii\.gz is one DRR for 2 X-rays"):
            io.pair_inputs(pair, drrs[0])
        with caplog.at_level("ERROR"):
            run = io.InferenceInputs(pair, drrs)
        assert [i["xray"] for i in run.items] == [pair[0]]
        assert f"{pair[1]}: constant image (all pixels 9.0); nothing to segment" in caplog.messages
        with pytest.raises(io.InputError, match=r"1 of 2 inputs were not segmented: .*blank\.png$"):
            run.raise_if_failed()


def test_inference_on_a_folder_of_formats_writes_one_output_each_and_they_agree(tmp_path):
    """A folder of one X-ray as .nii.gz, .mha, .nrrd, DICOM file and folder: one output each, named so, all equal."""
    arr = _picture()
    ids = _write_formats(tmp_path / "images" / "xray", arr)
    drr = ndimage.gaussian_filter(arr.astype(np.float32), 2)
    for i in ids:
        _write(drr, tmp_path / "images" / "drr" / f"{i}.nii.gz")
    out = tmp_path / "pred"
    run_bundle(BUNDLE, ["configs/inference.json"], env=ONE_THREAD, input_path=str(tmp_path / "images" / "xray"),
               output_dir=str(out))  # fmt: skip
    names = [f"{i}_{k}.{e}" for i in ids for k in ("mask", "attention") for e in ("png", "nii.gz")]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    import nibabel as nib

    att = {i: np.asarray(nib.load(out / f"{i}_attention.nii.gz").dataobj) for i in ids}
    assert att["a"].shape == arr.shape[::-1] and np.ptp(att["a"]) > 0
    assert all(np.array_equal(att[i], att["a"]) for i in ids), {i: float(np.abs(att[i] - att["a"]).max()) for i in ids}
    masks = {i: np.asarray(nib.load(out / f"{i}_mask.nii.gz").dataobj) for i in ids}
    assert all(np.array_equal(masks[i], masks["a"]) for i in ids)


def test_a_bad_item_in_a_list_is_refused_by_name_and_the_others_are_written(tmp_path):
    """In a list a missing and a blank X-ray are logged by name, the good one is written, the run fails naming them."""
    from PIL import Image

    arr = _picture().astype(np.float32)
    _write(arr, tmp_path / "x" / "good.nii.gz")
    Image.fromarray(np.full((48, 56), 9, np.uint8)).save(tmp_path / "x" / "blank.png")
    for n in ("good", "blank"):
        _write(ndimage.gaussian_filter(arr, 2), tmp_path / "drr" / f"{n}.nii.gz")
    inputs = [str(tmp_path / "x" / n) for n in ("gone.nii.gz", "blank.png", "good.nii.gz")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--input_path", json.dumps(inputs), "--drr_path", str(tmp_path / "drr"),
           "--output_dir", str(tmp_path / "pred")]  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **ONE_THREAD}
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{inputs[0]}: no such file or folder" in log
    assert f"{inputs[1]}: constant image (all pixels 9.0); nothing to segment" in log
    assert f"2 of 3 inputs were not segmented: {inputs[0]}, {inputs[1]}" in log
    assert "Traceback" not in log  # the summary ends the run, not MONAI's config-expression traceback
    written = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert written == sorted(f"good_{k}.{e}" for k in ("mask", "attention") for e in ("png", "nii.gz"))


# ----------------------------------------------------------------------------------------------
# bad input and faults: one line naming the file and the problem, never a deep traceback
# ----------------------------------------------------------------------------------------------

BAD_PAIRS = {  # what is wrong with the pair named "bad" -> what its one line says
    "3D X-ray": r"bad\.nii\.gz: NIfTI of shape \(56, 48, 5\); expected a 2D image",
    "3D DRR": r"drr/bad\.nii\.gz: NIfTI of shape \(56, 48, 5\); expected a 2D image",
    "all-NaN X-ray": r"bad\.nii\.gz: image holds NaN or infinite values",
    "constant X-ray": r"bad\.nii\.gz: constant image \(all pixels 7\.0\); nothing to segment",
    "almost constant DRR": r"drr/bad\.nii\.gz: almost constant image \(its 0\.5th and 99\.5th percentiles are both 0\)",
    "DRR of another aspect ratio": r"drr/bad\.nii\.gz: size 48 x 24 has another aspect ratio than .*bad\.nii\.gz",
    "truncated X-ray": r"bad\.nii\.gz: cannot be read \(EOFError",
    "empty X-ray file": r"bad\.nii\.gz: cannot be read \(ImageFileError",
}


@pytest.mark.parametrize("kind", list(BAD_PAIRS))
def test_each_kind_of_bad_pair_is_refused_in_one_line_and_the_good_one_goes_on(tmp_path, kind):
    """A 3D, all-NaN, (almost) constant, cut or empty image, a DRR of another field: refused by name, the next kept."""
    arr = _picture().astype(np.float32)  # (48, 56)
    drr = ndimage.gaussian_filter(arr, 2)
    write3d = lambda a, path: sitk.WriteImage(sitk.GetImageFromArray(np.stack([a] * 5)), str(path))  # noqa: E731
    for name in ("good", "bad"):
        _write(arr, tmp_path / "x" / f"{name}.nii.gz")
        _write(drr, tmp_path / "drr" / f"{name}.nii.gz")
    bad_x, bad_drr = tmp_path / "x" / "bad.nii.gz", tmp_path / "drr" / "bad.nii.gz"
    if kind == "3D X-ray":
        write3d(arr, bad_x)
    elif kind == "3D DRR":
        write3d(drr, bad_drr)
    elif kind == "all-NaN X-ray":
        _write(np.full_like(arr, np.nan), bad_x)
    elif kind == "constant X-ray":
        _write(np.full_like(arr, 7.0), bad_x)
    elif kind == "almost constant DRR":  # one bright pixel: the percentile scaling would divide by zero
        one = np.zeros_like(drr)
        one[10, 10] = 1.0
        _write(one, bad_drr)
    elif kind == "DRR of another aspect ratio":
        _write(drr[:, :24], bad_drr)
    elif kind == "truncated X-ray":
        bad_x.write_bytes(bad_x.read_bytes()[: bad_x.stat().st_size // 2])
    elif kind == "empty X-ray file":
        bad_x.write_bytes(b"")
    inputs = [str(bad_x), str(tmp_path / "x" / "good.nii.gz")]
    with bundle_scripts(BUNDLE) as scripts:
        run = scripts.io.InferenceInputs(inputs, str(tmp_path / "drr"))
    assert [i["xray"] for i in run.items] == inputs[1:]
    assert list(run.failed) == inputs[:1]
    line = f"{inputs[0]}: {run.failed[inputs[0]]}"
    assert "\n" not in line and re.search(BAD_PAIRS[kind], line), line


@pytest.mark.parametrize("content", ["{not json", '{"validation": []}', '{"training": [{"xray": "a.png"}]}'])
def test_a_broken_datalist_is_refused_naming_it(tmp_path, content):
    """A datalist.json that is not JSON, has no 'training' list or entries without xray/drr: one line naming it."""
    (tmp_path / "datalist.json").write_text(content)
    with bundle_scripts(BUNDLE) as scripts:
        start = re.escape(str(tmp_path / "datalist.json"))
        with pytest.raises(scripts.inputs.InputError, match=rf"^{start}: not a datalist"):
            scripts.io.read_datalist(tmp_path / "datalist.json")


BAD_CHECKPOINTS = {  # models/model.pt that is ... -> what its one line says after the file's name
    "a tensor": r"^ is not a plain state dict \(it holds a Tensor\)$",
    "a list": r"^ is not a plain state dict \(it holds a list\)$",
    "truncated": r"^ is not a plain state dict: truncated or not a torch file \(\w+: .+\)$",
    "empty": r"^ is not a plain state dict: the file is empty$",
    "a pickled module": r"^ is not a plain state dict: it holds Python objects .* weights-only load refuses",
    "another network's": r"^ does not fit network_def: \d+ of its \d+ weights missing .* another network's checkpoint",
    "another width's": r"^ does not fit network_def: \d+ weights of another shape \(e\.g\. \S+ \(.*backbone_width",
    "missing": r"^: no such checkpoint file$",
}


def _write_bad_checkpoint(kind: str, path: Path, network_module) -> None:
    """Write the bad ``models/model.pt`` of ``kind`` (a key of BAD_CHECKPOINTS) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shipped = (BUNDLE / "models" / "model.pt").read_bytes()
    if kind == "a tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "a list":
        torch.save([torch.zeros(3)], path)
    elif kind == "truncated":
        path.write_bytes(shipped[: len(shipped) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a pickled module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "another network's":
        from monai.networks.nets import UNet

        torch.save(UNet(2, 1, 1, (4, 8), (2,)).state_dict(), path)
    elif kind == "another width's":
        torch.save(network_module.CxrDrrFusionNet(backbone_width=8).state_dict(), path)


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_in_one_line_naming_it_at_inference_evaluation_and_init(tmp_path, kind):
    """A model.pt that is a tensor, a list, cut, empty, a pickled module, another network's or missing: one line."""
    from monai.bundle import ConfigParser

    ckpt = tmp_path / "ckpt" / "model.pt"
    where = {"inference": (["inference.json"], "handlers#0"),
             "evaluation": (["train.json", "evaluate.json"], "validate#handlers#0")}  # fmt: skip
    with bundle_scripts(BUNDLE) as scripts:
        _write_bad_checkpoint(kind, ckpt, scripts.network)
        for what, (configs, handler) in where.items():
            parser = ConfigParser()
            parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
            parser["ckpt_dir"] = str(ckpt.parent)
            with pytest.raises(Exception) as info:  # refused when the handler is built, before anything runs
                parser.get_parsed_content(handler)
            err = scripts.errors.user_error(info.value)  # what the run prints, as its last line
            assert isinstance(err, scripts.checkpoint.CheckpointError), (what, info.value)
            assert str(err).startswith(str(ckpt)), (what, str(err))
            assert re.search(BAD_CHECKPOINTS[kind], str(err).removeprefix(str(ckpt))), (what, str(err))
        net = parser.get_parsed_content("network_def")
        with pytest.raises(scripts.checkpoint.CheckpointError) as info:
            scripts.network.load_init_checkpoint(net, str(ckpt))
        msg = str(info.value).removeprefix(f"init_checkpoint {ckpt}")
        assert msg != str(info.value) and re.search(BAD_CHECKPOINTS[kind], msg), str(info.value)


def _run_expecting_failure(config_files: list[str], **overrides: str) -> str:
    """Run ``monai.bundle run`` as users do; assert that it failed with exit status 1; return its output."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps(config_files) if len(config_files) > 1 else config_files[0]]  # fmt: skip
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **ONE_THREAD}
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("case", ["bad checkpoint", "empty folder", "one 3D X-ray", "output_dir is a file",
                                  "evaluation pair all NaN"])  # fmt: skip
def test_a_run_that_cannot_go_on_ends_with_one_line_and_exit_status_1(tmp_path, case):
    """Bad checkpoint, nothing to segment, unwritable output_dir, bad evaluation pair: one line, exit 1, no trace."""
    arr = _picture().astype(np.float32)
    _write(arr, tmp_path / "x" / "p.nii.gz")
    _write(ndimage.gaussian_filter(arr, 2), tmp_path / "drr" / "p.nii.gz")
    infer = {"input_path": str(tmp_path / "x" / "p.nii.gz"), "drr_path": str(tmp_path / "drr"),
             "output_dir": str(tmp_path / "pred")}  # fmt: skip
    configs = ["configs/inference.json"]
    if case == "bad checkpoint":
        torch.save(torch.zeros(3), tmp_path / "model.pt")
        infer["ckpt_dir"] = str(tmp_path)
        line = f"{tmp_path / 'model.pt'} is not a plain state dict (it holds a Tensor)"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        infer["input_path"] = str(tmp_path / "empty")
        line = f"{tmp_path / 'empty'}: folder holds no readable image"
    elif case == "one 3D X-ray":
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr] * 3)), str(tmp_path / "x" / "p.nii.gz"))
        line = f"none of the 1 inputs can be segmented: {tmp_path / 'x' / 'p.nii.gz'}"
    elif case == "output_dir is a file":
        (tmp_path / "pred").write_text("")
        line = f"{tmp_path / 'pred'}: cannot write the outputs there (output_dir is a file, not a folder)"
    else:
        make_drr_set(tmp_path / "set", 2, folds=[0])
        bad = tmp_path / "set" / "images" / "xray" / "case001_p0.nii.gz"
        _write(np.full((SIZE, SIZE), np.nan, np.float32), bad)
        configs = ["configs/train.json", "configs/evaluate.json"]
        infer = {"dataset_dir": str(tmp_path / "set"), "output_dir": str(tmp_path / "eval"), "val_fold": "0",
                 **{k: str(v) for k, v in SMALL.items()}}  # fmt: skip
        line = f"{bad}: image holds NaN or infinite values"
    log = _run_expecting_failure(configs, **infer)
    assert "Traceback" not in log, log[-3000:]
    errors = [x for x in log.splitlines() if " - ERROR - " in x]
    assert errors and line in errors[-1], log[-2000:]  # the run's last word, said once
    assert sum(line in x for x in log.splitlines()) == 1, log[-2000:]


# ----------------------------------------------------------------------------------------------
# train / evaluate / infer / export, the way users run them
# ----------------------------------------------------------------------------------------------

TRAIN_EPOCHS = 8
# a short schedule for the tests: one epoch of attention warm-up, joint from epoch 2, fine-tuning from 7
SHORT = {
    **SMALL,
    "max_epochs": TRAIN_EPOCHS,
    "val_interval": 2,
    "learning_rate": 0.003,
    "phases_scratch__1__start_epoch": 2,
    "phases_scratch__2__start_epoch": 7,
}


def _untrained_checkpoint(path: Path) -> None:
    """The bundle's network as training starts (same config, same seed), saved as a state dict."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    with bundle_scripts(BUNDLE):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser["image_size"] = SIZE
        set_determinism(seed=0)
        net = parser.get_parsed_content("network_def")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A short training run on synthetic pairs; a separate held-out set of pairs for evaluation."""
    root = tmp_path_factory.mktemp("cxr_drr")
    train_set = make_drr_set(root / "train", 20, folds=[0, 1, 1, 1], seed=0, negatives=2)
    test_set = make_drr_set(root / "test", 8, folds=[0], seed=1, negatives=1)
    out = {
        "root": root,
        "train_set": train_set,
        "test_set": test_set,
        "ckpt_dir": root / "ckpt",
        "output_dir": root / "train_out",
    }
    out["train_proc"] = run_bundle(
        BUNDLE,
        ["configs/train.json"],
        env=ONE_THREAD,
        dataset_dir=str(train_set),
        ckpt_dir=str(out["ckpt_dir"]),
        output_dir=str(out["output_dir"]),
        **SHORT,
    )
    return out


def _evaluate(ckpt_dir: Path, test_set: Path, output_dir: Path, in_process: bool = False) -> Path:
    """Run train.json + evaluate.json on fold 0 of ``test_set`` (as users do, or in this process to save a start-up)."""
    overrides = {
        "dataset_dir": str(test_set),
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(output_dir),
        "val_fold": 0,
        **SMALL,
    }
    if in_process:
        from monai.bundle import run

        with bundle_scripts(BUNDLE):
            run(config_file=[str(BUNDLE / "configs" / c) for c in ("train.json", "evaluate.json")], **overrides)
    else:
        run_bundle(BUNDLE, ["configs/train.json", "configs/evaluate.json"], env=ONE_THREAD, **overrides)
    return output_dir


@pytest.mark.slow
def test_training_beats_untrained_start_on_heldout_pairs(trained, tmp_path):
    """A short training run (three phases) segments held-out pairs far better than its untrained start; evaluation writes per-image and per-size CSVs."""
    assert (trained["ckpt_dir"] / "model.pt").is_file() and (trained["ckpt_dir"] / "model_final.pt").is_file()
    assert list((trained["output_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    log = trained["train_proc"].stdout + trained["train_proc"].stderr
    assert all(f"phase '{p}'" in log for p in ("attention_warmup", "joint", "finetune"))
    _untrained_checkpoint(tmp_path / "untrained" / "model.pt")
    before = _evaluate(tmp_path / "untrained", trained["test_set"], tmp_path / "eval_before", in_process=True)
    after = _evaluate(trained["ckpt_dir"], trained["test_set"], tmp_path / "eval_after")
    dice_before = float(_group(before / "metrics.csv", "all")["dice"])
    dice_after = float(_group(after / "metrics.csv", "all")["dice"])
    assert dice_after > dice_before + 0.25, (dice_before, dice_after)
    att_after = float(_group(after / "metrics.csv", "all")["attention_dice"])
    assert att_after > float(_group(before / "metrics.csv", "all")["attention_dice"])
    rows = _read_csv(after / "per_image.csv")
    assert len(rows) == 8 and {"dice", "iou", "precision", "recall", "attention_dice", "max_diameter_mm"} <= set(
        rows[0]
    )
    groups = {r["group"]: int(r["n"]) for r in _read_csv(after / "metrics.csv")}
    assert groups["no_nodule"] == 1 and groups[">=10mm"] + groups["<10mm"] == groups["all"] == 7
    assert groups[">=10mm_contrast<=1"] + groups[">=10mm_contrast>1"] == groups[">=10mm"]
    contrast = [float(r["drr_contrast"]) for r in rows if float(r["label_pixels"]) > 0]
    assert all(c > 1 for c in contrast), contrast  # the test set's disks are bright in its DRRs


def test_drr_contrast_measures_how_far_the_nodule_stands_out_and_splits_the_summary(tmp_path):
    """drr_contrast: a bright disk on a noisy background scores high, an invisible one near 0, affine rescaling changes nothing; metrics.csv splits large nodules by it."""
    with bundle_scripts(BUNDLE) as scripts:
        h = scripts.handlers
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:64, 0:64]
        mask = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 16).astype(np.uint8)
        noise = rng.normal(0.0, 1.0, (64, 64))
        bright, hidden = noise + 4.0 * mask, noise.copy()
        assert 3.0 < h.drr_contrast(bright, mask) < 5.0
        assert abs(h.drr_contrast(hidden, mask)) < 1.0
        assert np.isclose(h.drr_contrast(bright * 0.01 + 7.0, mask), h.drr_contrast(bright, mask))
        assert np.isnan(h.drr_contrast(bright, np.zeros_like(mask)))
        assert np.isnan(h.drr_contrast(np.ones((64, 64)), mask))  # constant ring
        writer = h.PerImageMetrics(str(tmp_path))
        base = {"xray": "x", "case_id": "c", "iou": 0.0, "precision": 0.0, "recall": 0.0, "attention_dice": 0.0,
                "attention_dice_thresholded": 0.0, "fp_pixels": 0.0, "label_pixels": 9.0}  # fmt: skip
        writer.rows = [
            {**base, "max_diameter_mm": 12.0, "dice": 0.8, "drr_contrast": 2.0},
            {**base, "max_diameter_mm": 15.0, "dice": 0.1, "drr_contrast": 0.3},
            {**base, "max_diameter_mm": 11.0, "dice": 0.2, "drr_contrast": 0.9},
            {**base, "max_diameter_mm": 5.0, "dice": 0.0, "drr_contrast": 3.0},
        ]
        writer.write()
        summary = {r["group"]: r for r in _read_csv(tmp_path / "metrics.csv")}
        assert int(summary[">=10mm_contrast>1"]["n"]) == 1 and float(summary[">=10mm_contrast>1"]["dice"]) == 0.8
        assert int(summary[">=10mm_contrast<=1"]["n"]) == 2 and np.isclose(
            float(summary[">=10mm_contrast<=1"]["dice"]), 0.15
        )
        assert [r["drr_contrast"] for r in _read_csv(tmp_path / "per_image.csv")] == ["2.0", "0.3", "0.9", "3.0"]


def test_inference_png_and_dicom_pair_writes_mask_and_attention(trained, tmp_path):
    """inference.json takes a PNG X-ray and a DICOM DRR of another size and writes mask and attention (PNG + NIfTI) at the X-ray's size."""
    from PIL import Image

    import nibabel as nib

    item = json.loads((trained["test_set"] / "datalist.json").read_text())["training"][0]
    xray = sitk.GetArrayFromImage(sitk.ReadImage(str(trained["test_set"] / item["xray"])))
    drr = sitk.GetArrayFromImage(sitk.ReadImage(str(trained["test_set"] / item["drr"])))
    Image.fromarray(np.round(xray * 255).astype(np.uint8)).save(tmp_path / "cxr.png")
    big = ndimage.zoom(drr, 2, order=1)
    _write_dicom(tmp_path / "drr.dcm", 4095 - np.round(np.clip(big, 0, 1) * 4095), "MONOCHROME1")
    out = tmp_path / "pred"
    run_bundle(
        BUNDLE,
        ["configs/inference.json"],
        env=ONE_THREAD,
        ckpt_dir=str(trained["ckpt_dir"]),
        output_dir=str(out),
        input_path=str(tmp_path / "cxr.png"),
        drr_path=str(tmp_path / "drr.dcm"),
        image_size=SIZE,
    )
    mask_png = np.asarray(Image.open(out / "cxr_mask.png"))
    att_png = np.asarray(Image.open(out / "cxr_attention.png"))
    assert mask_png.shape == att_png.shape == xray.shape and set(np.unique(mask_png)) <= {0, 255}
    mask_nii = nib.load(out / "cxr_mask.nii.gz").get_fdata().T
    assert np.array_equal(mask_nii > 0, mask_png > 0)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(trained["test_set"] / item["label"])))
    inter = np.logical_and(mask_png > 0, label > 0).sum()
    assert 2 * inter / ((mask_png > 0).sum() + label.sum()) > 0.3  # the trained model finds the nodule
    assert att_png[label > 0].mean() > att_png[label == 0].mean()


def test_verify_net_in_out_and_ckpt_export(trained, tmp_path):
    """verify_net_in_out passes with metadata.json, and ckpt_export writes a TorchScript model that matches the eager network (MONAI's Python API)."""
    from monai.bundle import ckpt_export, verify_net_in_out

    meta, cfg = str(BUNDLE / "configs" / "metadata.json"), str(BUNDLE / "configs" / "inference.json")
    ts = tmp_path / "model.ts"
    with bundle_scripts(BUNDLE):
        verify_net_in_out(
            net_id="network_def", meta_file=meta, config_file=cfg, n=2, device="cpu"
        )  # raises on a mismatch
        ckpt_export(
            net_id="network_def",
            filepath=str(ts),
            ckpt_file=str(trained["ckpt_dir"] / "model.pt"),
            meta_file=meta,
            config_file=cfg,
        )
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 5
    with bundle_scripts(BUNDLE) as scripts:
        net = scripts.network.CxrDrrFusionNet(
            backbone_width=16, attention_channels=(16, 32, 48, 64, 64), decoder_channels=(128, 64, 32, 16, 16, 16)
        )
        net.load_state_dict(torch.load(trained["ckpt_dir"] / "model.pt", weights_only=True))
        x = torch.randn(1, 2, 64, 64)
        with torch.no_grad():
            assert torch.allclose(scripted(x), net.eval()(x), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# issue 8: the bundle folder alone, and multi-process training
# ----------------------------------------------------------------------------------------------

ALONE = textwrap.dedent(
    """
    import json, sys, torch
    from monai.bundle import ConfigParser
    import scripts
    xray, drr, out = sys.argv[1:4]
    p = ConfigParser()
    p.read_config("configs/inference.json")
    p.read_meta("configs/metadata.json")
    p.update({"xray_path": xray, "drr_path": drr, "output_dir": out, "device": "$torch.device('cpu')"})
    net = p.get_parsed_content("network")
    net.load_state_dict(torch.load("models/model.pt", map_location="cpu", weights_only=True))
    net.eval()
    d = p.get_parsed_content("preprocessing")({"xray": xray, "drr": drr})
    with torch.no_grad():
        d["pred"] = net(d["image"][None])[0]
        extra = {"metadata.json": ""}
        ts = torch.jit.load("models/model.ts", _extra_files=extra)
        same = bool(torch.allclose(ts(d["image"][None])[0], d["pred"], atol=1e-4))
    d = p.get_parsed_content("postprocessing")(d)
    print(json.dumps({"scripts": scripts.__file__, "pred": list(d["pred"].shape), "values": sorted(set(d["pred"].unique().tolist())),
                      "ts_same": same, "ts_channels": json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"]}))
    """
)


def test_bundle_folder_alone_loads_with_configparser_and_torchscript(trained, tmp_path):
    """The bundle folder copied alone loads in another process: preprocessing, the shipped model.pt, postprocessing, and model.ts with its metadata."""
    if not (BUNDLE / "models" / "model.pt").is_file() or not (BUNDLE / "models" / "model.ts").is_file():
        pytest.fail(
            "the shipped models/model.pt and models/model.ts are missing (see docs/README.md: how the shipped model is trained)"
        )
    alone = tmp_path / NAME
    shutil.copytree(BUNDLE, alone, ignore=shutil.ignore_patterns("__pycache__", "eval", "pred"))
    item = json.loads((trained["test_set"] / "datalist.json").read_text())["training"][0]
    args = [str(trained["test_set"] / item["xray"]), str(trained["test_set"] / item["drr"]), str(tmp_path / "pred")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", ALONE, *args],
        cwd=alone,
        capture_output=True,
        text=True,
        env={**env, **ONE_THREAD},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(res["scripts"]).resolve().parent.parent == alone.resolve()  # its own scripts, not the repository's
    assert res["pred"] == [1, 256, 256] and set(res["values"]) <= {0.0, 1.0}
    assert res["ts_same"] and res["ts_channels"] == 5
    assert (tmp_path / "pred" / f"{Path(item['xray']).name[:-7]}_mask.png").is_file()


@pytest.mark.long
def test_torchrun_two_processes_train_one_epoch_to_a_checkpoint(trained, tmp_path):
    """torchrun --nproc_per_node=2 with train.json + multi_gpu_train.json (gloo on CPU, DistributedSampler) trains one epoch to a checkpoint,
    and each rank frees its DDP wrapper before the interpreter shuts down."""
    configs = json.dumps(
        [str(BUNDLE / "configs" / c) for c in ("train.json", "multi_gpu_train.json")]
        + [ddp_release_probe(BUNDLE, tmp_path)]
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--tee=3",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs,
        "--dataset_dir",
        str(trained["train_set"]),
        "--ckpt_dir",
        str(tmp_path / "ckpt"),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_epochs",
        "1",
        "--val_interval",
        "1",
        "--image_size",
        str(SIZE),
        "--num_workers",
        "0",
        "--batch_size",
        "2",
    ]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **ONE_THREAD}
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    sd = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert "backbone.conv1.weight" in sd and not any(
        k.startswith("module.") for k in sd
    )  # plain state dict, DDP unwrapped
    assert_ddp_released_before_exit(proc.stdout)


def test_drr_slabs_enter_as_extra_channels_and_widen_a_two_channel_checkpoint(tmp_path):
    """drr_slab_keys: the configs load, scale, crop and stack the slab files after the DRR (4 channels for 2 slabs);
    a checkpoint trained without slabs loads with zero weights for them (same output whatever the slabs hold); a set
    or a pair without the slab files is refused by name."""
    from monai.bundle import ConfigParser

    root = make_drr_set(tmp_path / "set", 4, [0, 1])
    dl = json.loads((root / "datalist.json").read_text())
    for item in dl["training"]:
        drr = sitk.GetArrayFromImage(sitk.ReadImage(str(root / item["drr"])))
        for j, part in enumerate((0.3 * drr, np.fliplr(drr))):  # slab 1 mirrored: a mix-up of files shows
            item[f"drr_slab{j}"] = f"images/drr_slab{j}/{Path(item['drr']).name}"
            _write(part.astype(np.float32), root / item[f"drr_slab{j}"])
    (root / "datalist.json").write_text(json.dumps(dl))
    slab_keys = ["drr_slab0", "drr_slab1"]
    with bundle_scripts(BUNDLE) as scripts:
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser.update({"dataset_dir": str(root), "image_size": SIZE, "num_workers": 0, "drr_slab_keys": slab_keys,
                       "backbone_width": 8, "attention_channels": [8, 8, 8, 8, 8], "decoder_channels": [16, 16, 8, 8, 8, 8],
                       "train_patch_size": 32, "train_patches_per_image": 2})  # fmt: skip
        val = parser.get_parsed_content("validate#preprocessing")(
            scripts.io.read_datalist(root / "datalist.json", folds=0)[0]
        )
        assert val["image"].shape == (4, SIZE, SIZE)
        assert torch.allclose(val["image"][2], val["image"][1], atol=1e-5)  # each slab scaled to drr_range like the DRR
        assert torch.allclose(
            val["image"][3], val["image"][1].flip(-1), atol=1e-5
        )  # the second slab's own file, in order
        assert not torch.allclose(val["image"][3], val["image"][1], atol=1e-3)
        patches = parser.get_parsed_content("train#preprocessing")(
            scripts.io.read_datalist(root / "datalist.json", folds=1)[0]
        )
        assert len(patches) == 2 and all(
            p["image"].shape == (4, 32, 32) and p["label"].shape == (1, 32, 32) for p in patches
        )
        net = parser.get_parsed_content("network_def")
        assert net.attention.stem[0].weight.shape[1] == 3  # DRR + 2 slabs
        # a two-channel checkpoint widens into the slab network (and into one with DRR skips)
        kw = dict(backbone_width=8, attention_channels=(8, 8, 8, 8, 8), decoder_channels=(16, 16, 8, 8, 8, 8))
        torch.manual_seed(4)
        src = scripts.network.CxrDrrFusionNet(**kw).eval()
        torch.save(src.state_dict(), tmp_path / "two.pt")
        x = torch.randn(1, 4, SIZE, SIZE)
        for skips in (False, True):
            wide = scripts.network.CxrDrrFusionNet(in_channels=4, drr_skips=skips, **kw)
            scripts.network.load_init_checkpoint(wide, str(tmp_path / "two.pt"))
            wide.eval()
            with torch.no_grad():
                y = wide(x)
                x2 = x.clone()
                x2[:, 2:] = torch.randn(1, 2, SIZE, SIZE)
                assert torch.equal(wide(x2), y)
                if not skips:
                    assert torch.allclose(y, src(x[:, :2]), atol=1e-6)
        # inference: the slab keys come from the datalist, from --drr_slab_paths, or from the set's folders
        items, failed = scripts.io.pair_inputs(None, None, str(root / "datalist.json"), 0, None, slab_keys)
        assert set(items[0]) == {"xray", "drr", *slab_keys} and os.path.isabs(items[0]["drr_slab1"]) and not failed
        items, failed = scripts.io.pair_inputs(str(root / "images" / "xray"), slab_keys=slab_keys)
        assert len(items) == 4 and not failed
        keys = ["drr", *slab_keys]
        assert all(Path(it[k]) == root / "images" / k / Path(it["xray"]).name for it in items for k in keys)
        bare = make_drr_set(tmp_path / "bare", 2, [0])
        entry = scripts.io.read_datalist(bare / "datalist.json")[0]
        with pytest.raises(Exception) as err:  # training/evaluation on a set without slabs (MONAI wraps the error)
            parser.get_parsed_content("validate#preprocessing")(entry)
        chain = [err.value, err.value.__cause__, err.value.__context__]
        assert any(
            isinstance(e, scripts.io.InputError)
            and "case000_p0.nii.gz: no drr_slab0, drr_slab1 in its datalist entry" in str(e)
            for e in chain
        )
        with pytest.raises(scripts.io.InputError, match="bare/datalist.json.*no drr_slab0, drr_slab1.*--drr-slabs"):
            scripts.io.pair_inputs(None, None, str(bare / "datalist.json"), None, None, slab_keys)
        x, d, s0, s1 = (str(tmp_path / n) for n in ("x.png", "d.png", "s0.png", "s1.png"))
        for f in (x, d, s0, s1):
            Path(f).touch()
        with pytest.raises(scripts.io.InputError, match="takes 2 DRR slab.*gave 1"):
            scripts.io.pair_inputs(x, d, None, None, [s0], slab_keys)
        one, failed = scripts.io.pair_inputs(x, d, None, None, [s0, s1], slab_keys)
        assert one == [{"xray": x, "drr": d, "drr_slab0": s0, "drr_slab1": s1}] and not failed
