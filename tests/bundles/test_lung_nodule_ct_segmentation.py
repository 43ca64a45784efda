"""Tests of the lung_nodule_ct_segmentation bundle (3D AttentionUnet with deep supervision, LUNA16)."""

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

import nibabel as nib
import numpy as np
import pytest
import torch

from .conftest import BUNDLES, assert_ddp_released_before_exit, bundle_scripts, ddp_release_probe, run_bundle

BUNDLE = BUNDLES / "lung_nodule_ct_segmentation"
# Small enough for CPU tests: 32^3 patches, one scan per step, tiny epochs.
FAST = {
    "patch_size": [32, 32, 32],
    "num_samples": 2,
    "num_workers": 0,
    "infer_roi_size": [64, 64, 32],
    "sw_batch_size": 4,
}


def _crop_case(src: Path, dst: Path, item: dict, half: int = 40) -> dict:
    """Crop one prepared case to a (2*half)^2 x D box around its largest nodule (or the lung centre)."""
    out = {}
    lab_img = nib.load(src / item["label"])
    lab = np.asarray(lab_img.dataobj)
    where = np.argwhere(lab > 0)
    if len(where) == 0:
        where = np.argwhere(np.asarray(nib.load(src / item["lung"]).dataobj) > 0)
    cx, cy = np.round(where[:, :2].mean(axis=0)).astype(int)
    x0 = int(np.clip(cx - half, 0, lab.shape[0] - 2 * half))
    y0 = int(np.clip(cy - half, 0, lab.shape[1] - 2 * half))
    for key in ("image", "label", "lung"):
        img = nib.load(src / item[key])
        arr = np.asarray(img.dataobj)[x0 : x0 + 2 * half, y0 : y0 + 2 * half]
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ np.array([x0, y0, 0]) + img.affine[:3, 3]
        path = dst / item[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine, img.header), path)
        out[key] = item[key]
    return {**item, **out}


@pytest.fixture(scope="module")
def tiny_luna(luna16_demo_prepared, tmp_path_factory) -> Path:
    """The LUNA16 demo cases cropped to 80 x 80 x D around their nodules; the last nodule case is fold 0 (held out)."""
    dst = tmp_path_factory.mktemp("tiny_luna")
    src = luna16_demo_prepared
    datalist = json.loads((src / "datalist.json").read_text())
    items = [_crop_case(src, dst, it) for it in datalist["training"]]
    has_nodule = [bool(np.asarray(nib.load(dst / it["label"]).dataobj).max() > 0) for it in items]
    held = max(i for i, h in enumerate(has_nodule) if h)
    for i, it in enumerate(items):
        it["fold"] = 0 if i == held else 1
    datalist["training"] = items
    (dst / "datalist.json").write_text(json.dumps(datalist))
    shutil.copy(src / "nodules.csv", dst / "nodules.csv")
    return dst


def _meta_tensor(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), name="scan.nii.gz"):
    from monai.data import MetaTensor

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return MetaTensor(
        torch.as_tensor(arr)[None].float(), affine=torch.as_tensor(affine), meta={"filename_or_obj": name}
    )


def test_deep_supervision_lists_in_training_and_plain_tensor_in_eval():
    """Training mode returns main + auxiliary logits at input size; eval mode returns MONAI AttentionUnet's output from the same state dict."""
    from monai.networks.nets import AttentionUnet

    with bundle_scripts(BUNDLE) as scripts:
        net = scripts.DeepSupervisionAttentionUnet(channels=(4, 8, 16, 32), strides=(2, 2, 2), deep_supr_num=2)
    x = torch.randn(2, 1, 24, 24, 16)
    outs = net.train()(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (2, 1, 24, 24, 16) for o in outs)
    plain = AttentionUnet(3, 1, 1, (4, 8, 16, 32), (2, 2, 2))
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.startswith("deep_supervision_heads.") for k in unexpected)
    net.eval(), plain.eval()
    with torch.no_grad():
        y = net(x)
        assert isinstance(y, torch.Tensor)
        torch.testing.assert_close(y, plain(x))
        torch.testing.assert_close(net.train()._forward_deep_supervision(x)[0], plain.train()(x))


def test_bad_input_gets_clear_messages(tmp_path):
    """Spacing not matching the config, too coarse slices, scans smaller than the patch and an empty label set are refused naming the file."""
    with bundle_scripts(BUNDLE) as scripts:
        aniso = {"image": _meta_tensor(np.zeros((40, 40, 16)), spacing=(0.7, 0.7, 2.5), name="/data/aniso.nii.gz")}
        with pytest.raises(ValueError, match=r"aniso\.nii\.gz.*does not match the config's pixdim"):
            scripts.CheckSpacingd("image", pixdim=(1, 1, 1), require_match=True)(aniso)
        assert scripts.CheckSpacingd("image", pixdim=(1, 1, 1), require_match=False)(aniso)["image"] is aniso["image"]
        thick = {"image": _meta_tensor(np.zeros((40, 40, 8)), spacing=(0.7, 0.7, 5.0), name="/data/thick.nii.gz")}
        with pytest.raises(ValueError, match=r"thick\.nii\.gz.*coarser than 3"):
            scripts.CheckSpacingd("image", pixdim=(1, 1, 1))(thick)

        small = {
            "image": _meta_tensor(np.ones((40, 40, 12)), name="/data/thin.nii.gz"),
            "label": _meta_tensor(np.ones((40, 40, 12))),
        }
        with pytest.raises(
            ValueError, match=r"thin\.nii\.gz: scan of 40 x 40 x 12 voxels.*smaller than the patch 32 x 32 x 32"
        ):
            scripts.CheckSized(["image", "label"], (32, 32, 32), mode="raise")(small)
        padded = scripts.CheckSized(["image", "label"], (32, 32, 32), mode="pad")(small)
        assert padded["image"].shape == (1, 40, 40, 32) and padded["label"].shape == (1, 40, 40, 32)
        assert float(padded["image"][0, :, :, 0].max()) == 0.0 and float(padded["image"][0, :, :, 15].min()) == 1.0

        (tmp_path / "images").mkdir()
        (tmp_path / "labels").mkdir()
        items = []
        for i in range(3):
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / f"images/c{i}.nii.gz")
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / f"labels/c{i}.nii.gz")
            items.append(
                {"case_id": f"c{i}", "image": f"images/c{i}.nii.gz", "label": f"labels/c{i}.nii.gz", "fold": i % 2}
            )
        (tmp_path / "datalist.json").write_text(json.dumps({"training": items}))
        with pytest.raises(ValueError, match="empty label set"):
            scripts.load_split(tmp_path / "datalist.json", tmp_path, 1, "train")
        assert len(scripts.load_split(tmp_path / "datalist.json", tmp_path, 1, "val")) == 1
        with pytest.raises(FileNotFoundError, match="missing.json not found"):
            scripts.load_split(tmp_path / "missing.json", tmp_path, 0, "train")


def test_froc_and_cpm_follow_luna16_rules():
    """A candidate counts as a hit inside the nodule radius only; sensitivities at 1/8..8 FP per scan and CPM are read from the curve."""
    with bundle_scripts(BUNDLE) as scripts:
        det = scripts.detection
        label = np.zeros((40, 40, 40), np.int32)
        label[8:13, 8:13, 8:13] = (
            1  # 125 voxels at 1 mm: equivalent diameter 6.2 mm, radius 3.1 mm, centre (10, 10, 10)
        )
        label[28:31, 28:31, 28:31] = 2  # centre (29, 29, 29)
        nods = det.reference_nodules(label, (1, 1, 1))
        assert [n["label"] for n in nods] == [1, 2]
        assert abs(nods[0]["diameter_mm"] - (6 * 125 / np.pi) ** (1 / 3)) < 1e-6
        cands = [
            {"centre": np.array([12.0, 10.0, 10.0]), "score": 0.9},  # 2 mm from nodule 1: hit
            {"centre": np.array([10.0, 14.0, 10.0]), "score": 0.95},  # 4 mm > 3.1 mm radius: false positive
            {"centre": np.array([29.0, 29.0, 30.0]), "score": 0.3},  # 1 mm from nodule 2: hit
        ]
        det.match_case(nods, cands, (1, 1, 1))
        assert [c["nodule"] for c in cands] == [1, 0, 2]
        assert [n["score"] for n in nods] == [0.9, 0.3]
        # Two scans: FPs 0.95, 0.5, 0.2 -> at threshold 0.9: sens 1/2 with 1 FP (0.5/scan); threshold 0.3: 2/2 with 2 FP (1/scan).
        res = det.froc([0.9, 0.3], [0.95, 0.5, 0.2], n_scans=2)
        expected = {0.125: 0.0, 0.25: 0.0, 0.5: 0.5, 1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}
        for rate, sens in expected.items():
            assert res[f"sensitivity@{rate:g}"] == sens
        assert res["cpm"] == pytest.approx(sum(expected.values()) / 7)
        pred = np.zeros_like(label)
        pred[8:13, 8:13, 9:14] = 1  # shifted by one slice: 100 of 125 voxels overlap
        assert det.local_dice(label, pred, 1, margin=3) == pytest.approx(2 * 100 / 250)


def test_candidates_are_ranked_by_mean_not_saturated_max_probability():
    """Two components that both reach 1.0: the one that is confident throughout outranks a faint one with a saturated core."""
    with bundle_scripts(BUNDLE) as scripts:
        prob = np.zeros((30, 30, 30), np.float32)
        prob[3:8, 3:8, 3:8] = 0.99  # nodule-like: confident everywhere
        prob[5, 5, 5] = 1.0
        prob[18:26, 18:22, 18:22] = 0.3  # vessel-like fragment: faint, one saturated voxel
        prob[20, 20, 20] = 1.0
        prob[0:2, 28:30, 28:30] = 0.9  # 8 voxels: below min_volume_mm3 = 10 at 1 mm
        cands = scripts.detection.candidates(prob, 0.2, (1.0, 1.0, 1.0), min_volume_mm3=10.0)
        assert len(cands) == 2
        assert [c["max_prob"] for c in cands] == [1.0, 1.0]
        nodule, vessel = sorted(cands, key=lambda c: c["centre"][0])
        assert nodule["score"] == pytest.approx((124 * 0.99 + 1.0) / 125, rel=1e-5)
        assert vessel["score"] == pytest.approx((127 * 0.3 + 1.0) / 128, rel=1e-5)
        assert nodule["volume_mm3"] == 125 and vessel["volume_mm3"] == 128


def test_init_checkpoint_loads_weights_and_refuses_bad_files(tmp_path):
    """Fine-tuning starts from the file's weights (plain or under "model"); a wrong file is named in the error."""
    with bundle_scripts(BUNDLE) as scripts:
        make = lambda: scripts.DeepSupervisionAttentionUnet(channels=(4, 8, 16), strides=(2, 2), deep_supr_num=1)  # noqa: E731
        torch.manual_seed(0)
        src, dst = make(), make()
        assert not all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
        torch.save({"model": src.state_dict()}, tmp_path / "ck.pt")
        scripts.network.load_initial_weights(dst, str(tmp_path / "ck.pt"))
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
        assert scripts.network.load_initial_weights(dst, "") is dst
        torch.save(
            scripts.DeepSupervisionAttentionUnet(channels=(4, 8, 32), strides=(2, 2), deep_supr_num=1).state_dict(),
            tmp_path / "other.pt",
        )
        with pytest.raises(ValueError, match="other.pt does not fit network_def"):
            scripts.network.load_initial_weights(dst, str(tmp_path / "other.pt"))
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match="junk.pt: not a weights-only"):
            scripts.network.load_initial_weights(dst, str(tmp_path / "junk.pt"))
        with pytest.raises(FileNotFoundError, match="missing.pt"):
            scripts.network.load_initial_weights(dst, str(tmp_path / "missing.pt"))


def test_tta_flag_from_the_command_line_means_what_it_says():
    """``--tta false`` arrives as the string 'false' (truthy in Python): it must switch TTA off, and a typo is refused by name."""
    from monai.bundle import ConfigParser

    with bundle_scripts(BUNDLE):
        for given, expected in [("false", False), ("False", False), ("true", True), (True, True), (0, False)]:
            parser = ConfigParser()
            parser.read_config(str(BUNDLES / BUNDLE / "configs" / "inference.json"))
            parser["tta"] = given
            assert parser.get_parsed_content("inferer").flip_tta is expected, given
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / BUNDLE / "configs" / "inference.json"))
        parser["tta"] = "ture"
        with pytest.raises(RuntimeError) as err:  # MONAI wraps it; the cause names the key
            parser.get_parsed_content("inferer")
        assert "flip_tta (the config's tta): expected true or false, got 'ture'" in str(err.value.__cause__)


def test_second_scale_finds_a_mass_the_first_sees_only_as_a_rim():
    """A detector tuned to small blobs (as patch training makes it) sees a large mass only at its rim; the 2x pass fills it."""
    import torch.nn.functional as F
    from monai.bundle import ConfigParser

    class SmallBlobDetector(
        torch.nn.Module
    ):  # white top-hat over a 15-voxel box: positive on blobs narrower than the box
        def forward(self, x):
            local = F.avg_pool3d(x, 15, stride=1, padding=7, count_include_pad=False)
            return 10.0 * (x - local - 0.25)

    vol = torch.zeros(1, 1, 64, 64, 48)
    vol[..., 8:14, 8:14, 8:14] = 1.0  # 6-voxel nodule
    vol[..., 30:54, 30:54, 12:36] = 1.0  # 24-voxel mass
    small, large = vol.clone(), vol.clone()
    small[..., 30:54, 30:54, 12:36] = 0
    large[..., 8:14, 8:14, 8:14] = 0
    with bundle_scripts(BUNDLE) as scripts:
        one = scripts.NoduleSlidingWindowInferer(roi_size=[64, 64, 48], scales=[1.0])(vol, SmallBlobDetector())
        two = scripts.NoduleSlidingWindowInferer(roi_size=[64, 64, 48], scales=[1.0, 2.0])(vol, SmallBlobDetector())
        with pytest.raises(ValueError, match="scales must be voxel-size factors >= 1.0"):
            scripts.NoduleSlidingWindowInferer(roi_size=32, scales=[0.5])
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.json"))
        assert parser.get_parsed_content("inferer").scales == (1.0, 2.0)  # the shipped default
    assert one.shape == two.shape == vol.shape
    mass, nodule = large[0, 0] > 0, small[0, 0] > 0
    far = torch.zeros_like(mass)
    far[:, :, 42:] = True  # 6+ voxels from both objects
    far[30:54, 30:54] = False
    found_one, found_two = (one[0, 0] > 0), (two[0, 0] > 0)
    core = torch.zeros_like(mass)
    core[36:48, 36:48, 18:30] = True  # the mass's inner 12^3
    assert not found_one[core].any()  # one pass finds only the rim
    assert found_two[core].all() and found_two[mass].float().mean() > 0.95  # the 2x pass fills the mass
    assert found_one[nodule].all() and found_two[nodule].all()  # the small nodule is kept
    assert not found_two[far].any()  # the coarse pass adds nothing far from the objects


def test_coarse_pass_windows_are_shrunk_without_adding_windows():
    """A coarse pass's window is cut to the smallest multiple of 8 that MONAI still tiles with as many windows; the 1 mm pass keeps its window."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    def monai_windows(shape, roi, overlap=0.25):
        return len(dense_patch_slices(shape, roi, _get_scan_interval(shape, roi, len(shape), (overlap,) * len(shape))))

    with bundle_scripts(BUNDLE) as scripts:
        inf = scripts.NoduleSlidingWindowInferer(roi_size=[96, 96, 96], overlap=0.25)
        for shape in [(158, 115, 150), (315, 230, 300), (40, 200, 97)]:
            inf._fit_roi(shape)
            full = list(inf.roi_size)
            inf._fit_roi(shape, tight=True)
            tight = list(inf.roi_size)
            assert full == [min(96, -(-s // 8) * 8) for s in shape]
            assert all(t <= f and t % 8 == 0 for t, f in zip(tight, full))
            assert monai_windows(shape, tight) == monai_windows(shape, full)
            assert all(
                monai_windows(shape, [*tight[:i], tight[i] - 8, *tight[i + 1 :]]) > monai_windows(shape, full)
                for i in range(3)
                if tight[i] > 8
            )
        inf._fit_roi((158, 115, 150), tight=True)
        assert inf.roi_size == [96, 72, 88]  # 2 windows per axis either way, 31 % fewer voxels per window


def test_nodule_table_in_world_lps_mm():
    """The nodule table gives each component's centre in world LPS mm, volume in mm^3 and mean probability."""
    with bundle_scripts(BUNDLE) as scripts:
        mask = np.zeros((20, 20, 10), np.float32)
        mask[4:8, 10:14, 2:4] = 1  # 32 voxels, centre voxel (5.5, 11.5, 2.5)
        prob = mask * 0.8
        # MONAI affines are RAS: voxel (i, j, k) -> RAS (2i - 100, 2j + 50, 2k + 10) mm; LPS = (-x, -y, z).
        m = _meta_tensor(mask, spacing=(2.0, 2.0, 2.0), origin=(-100.0, 50.0, 10.0))
        out = scripts.NoduleTabled("pred", prob_key="prob")({"pred": m, "prob": _meta_tensor(prob)})
    (row,) = out["nodules"]
    assert (row["centre_x_mm"], row["centre_y_mm"], row["centre_z_mm"]) == (89.0, -73.0, 15.0)
    assert row["volume_mm3"] == 32 * 8 and row["mean_probability"] == pytest.approx(0.8)
    assert row["equivalent_diameter_mm"] == pytest.approx((6 * 256 / np.pi) ** (1 / 3), abs=0.01)


def test_nodule_table_rows_largest_first_with_each_components_own_statistics():
    """Several components (one touching the volume's edge): rows largest first, each with its own voxel count, centre, mean and max probability."""
    rng = np.random.default_rng(3)
    mask = np.zeros((40, 30, 20), np.float32)
    prob = rng.uniform(0.0, 0.4, size=mask.shape).astype(np.float32)  # background probability must not leak in
    boxes = {
        "small": (slice(2, 4), slice(3, 5), slice(0, 2)),
        "large": (slice(20, 26), slice(10, 15), slice(8, 12)),
        "edge": (slice(37, 40), slice(27, 30), slice(17, 20)),
    }
    for box in boxes.values():
        mask[box] = 1
        prob[box] = rng.uniform(0.5, 1.0, size=prob[box].shape)
    with bundle_scripts(BUNDLE) as scripts:
        rows = scripts.NoduleTabled("pred", prob_key="prob")({"pred": _meta_tensor(mask), "prob": _meta_tensor(prob)})[
            "nodules"
        ]
    assert [r["volume_mm3"] for r in rows] == [120.0, 27.0, 8.0] and [r["nodule"] for r in rows] == [1, 2, 3]
    for row, name in zip(rows, ["large", "edge", "small"]):
        box = boxes[name]
        centre = [(sl.start + sl.stop - 1) / 2 for sl in box]
        assert (row["voxel_i"], row["voxel_j"], row["voxel_k"]) == pytest.approx(centre)
        assert row["mean_probability"] == pytest.approx(float(prob[box].mean()), abs=1e-4)
        assert row["max_probability"] == pytest.approx(float(prob[box].max()), abs=1e-4)


def test_post_processing_in_the_foreground_box_equals_the_whole_volume():
    """RemoveSmallObjectsd + FillHolesd inside the foreground box give MONAI's whole-volume result (holes, specks, a border-touching blob, an empty mask)."""
    from monai.transforms import Compose, FillHolesd, RemoveSmallObjectsd

    def steps():
        return [RemoveSmallObjectsd("pred", min_size=10.0, by_measure=True, connectivity=3), FillHolesd("pred")]

    rng = np.random.default_rng(5)
    mask = np.zeros((60, 50, 40), np.float32)
    mask[10:20, 10:20, 10:20] = 1
    mask[13:17, 13:17, 13:17] = 0  # an enclosed hole: filled
    mask[30:36, 5:11, 0:6] = 1
    mask[32:34, 7:9, 0:2] = 0  # a dent open to the volume's face: stays open
    mask[50, 45, 35] = 1  # a 1-voxel speck at 0.5 x 0.5 x 1 mm: removed (< 10 mm^3)
    mask[5, 40, 15:35] = (
        1  # 20 voxels = 5 mm^3: removed only if the crop kept the spacing (20 voxels at 1 mm would stay)
    )
    mask[40:46, 28:34, 18:23] = rng.uniform(size=(6, 6, 5)) > 0.3  # a ragged blob of about 125 voxels (31 mm^3): kept
    with bundle_scripts(BUNDLE) as scripts:
        for m in (mask, np.zeros_like(mask)):
            want = Compose(steps())({"pred": _meta_tensor(m, spacing=(0.5, 0.5, 1.0))})["pred"]
            got = scripts.InForegroundBoxd("pred", transforms=steps())(
                {"pred": _meta_tensor(m, spacing=(0.5, 0.5, 1.0))}
            )["pred"]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    assert want.sum() == 0 and torch.as_tensor(got).sum() == 0  # the empty mask stayed empty
    full = Compose(steps())({"pred": _meta_tensor(mask, spacing=(0.5, 0.5, 1.0))})["pred"]
    assert (
        full[0, 15, 15, 15] == 1
        and full[0, 33, 8, 0] == 0
        and full[0, 50, 45, 35] == 0
        and full[0, 5, 40, 30] == 0
        and full[0, 42:44, 30:32, 20:22].any()
    )  # the cases above do occur


def test_hard_negatives_come_mostly_from_the_lungs():
    """Negative patch centres: the configured share inside the grown lung mask, none on a nodule, none in air."""
    with bundle_scripts(BUNDLE) as scripts:
        image = np.zeros((60, 40, 30), np.float32)  # window-scaled: 0 = air
        image[:, :, 20:] = 0.7  # "chest wall": dense, outside the lungs, 60*40*10 = 24000 voxels
        image[10:50:4, 5:35:4, 2:18:3] = 0.7  # "vessels" inside the lung: sparse dense voxels
        lung = np.zeros_like(image)
        lung[5:55, 2:38, 0:18] = 1
        label = np.zeros_like(image)
        label[20:25, 20:25, 5:10] = 1
        image[label > 0] = 0.7
        data = {"image": _meta_tensor(image), "label": _meta_tensor(label), "lung": _meta_tensor(lung)}
        out = scripts.HardNegativeIndicesd("label", image_threshold=0.3, lung_fraction=0.75, lung_margin_mm=1.0)(data)
        bg, fg = out["label_bg_indices"], out["label_fg_indices"]
        grown = np.zeros_like(lung, bool)
        grown[4:56, 1:39, 0:19] = True  # the lung grown by 1 mm (6-connected ball of radius 1 reaches the faces)
        assert set(fg.tolist()) == set(np.flatnonzero(label).tolist())
        assert not np.isin(bg, fg).any() and (image.ravel()[bg] > 0.3).all()
        inside = grown.ravel()[bg].mean()
        assert 0.7 < inside < 0.8, inside
        # without a lung mask: every dense non-nodule voxel is a candidate, as FgBgToIndicesd does
        plain = scripts.HardNegativeIndicesd("label", image_threshold=0.3)({k: data[k] for k in ("image", "label")})
        assert len(plain["label_bg_indices"]) == int(((image > 0.3) & (label == 0)).sum())
        with pytest.raises(ValueError, match="lung_fraction"):
            scripts.HardNegativeIndicesd("label", lung_fraction=1.5)


def test_positive_centres_balanced_per_nodule_and_attached_nodules_weighted():
    """Positive centres: by default every nodule voxel; "nodule" mode gives each nodule the same share
    whatever its size, and a nodule touching soft tissue gets ``attached_weight`` times its share."""
    with bundle_scripts(BUNDLE) as scripts:
        image = np.full((60, 40, 30), 0.15, np.float32)  # window-scaled lung parenchyma (about -790 HU)
        image[:, :, 24:] = 0.75  # chest wall (about +50 HU)
        label = np.zeros_like(image)
        label[10:22, 10:22, 6:18] = 1  # big nodule (12^3 = 1728 voxels) in the middle of the lung
        label[40:44, 20:24, 20:24] = 2  # small nodule (64 voxels) touching the wall (z 24)
        image[label > 0] = 0.75
        data = {"image": _meta_tensor(image), "label": _meta_tensor(label)}
        big, small = np.flatnonzero(label == 1), np.flatnonzero(label == 2)

        plain = scripts.HardNegativeIndicesd("label", image_threshold=0.3)(data)["label_fg_indices"]
        assert sorted(plain.tolist()) == sorted(np.flatnonzero(label).tolist())  # unchanged default

        def shares(**kw):
            fg = scripts.HardNegativeIndicesd("label", image_threshold=0.3, **kw)(data)["label_fg_indices"]
            assert np.isin(fg, np.flatnonzero(label)).all()  # positives only on nodules
            return np.isin(fg, big).sum(), np.isin(fg, small).sum()

        b, s = shares(positive_balance="nodule", per_nodule=500)
        assert (b, s) == (500, 500)
        thr = 0.4  # between parenchyma and wall: the small nodule's 3 mm shell is about a third wall
        b, s = shares(positive_balance="nodule", per_nodule=500, attached_threshold=0.3, attached_weight=4)
        assert (b, s) == (500, 2000)
        b, s = shares(attached_threshold=0.3, attached_weight=3)  # voxel mode: the attached nodule's voxels x3
        assert (b, s) == (big.size, 3 * small.size)
        b, s = shares(positive_balance="nodule", per_nodule=500, attached_threshold=thr, attached_weight=4)
        assert (b, s) == (500, 500)  # a shell mean of about 0.35 is below 0.4: not attached

        comps = np.asarray(label, np.int32)
        means = scripts.sampling.shell_means(comps, 2, image, (1.0, 1.0, 1.0), 3.0)
        assert abs(means[0] - 0.15) < 1e-6  # big nodule: parenchyma all round
        assert 0.3 < means[1] < 0.4  # small one: part wall, part parenchyma
        with pytest.raises(ValueError, match="positive_balance"):
            scripts.HardNegativeIndicesd("label", positive_balance="size")
        with pytest.raises(ValueError, match="attached_weight"):
            scripts.HardNegativeIndicesd("label", attached_weight=0.5)


def test_scans_with_attached_nodules_drawn_more_often():
    """attached_scan_weight: a scan holding a nodule that touches the chest wall is drawn that many times as often."""
    from monai.data import CacheDataset

    with bundle_scripts(BUNDLE) as scripts:
        items = []
        for attached in (True, False, False, False):
            image = np.full((40, 40, 30), 0.15, np.float32)
            image[:, :, 24:] = 0.75  # chest wall
            label = np.zeros_like(image)
            z = slice(20, 24) if attached else slice(8, 12)  # touching the wall at z 24, or in mid-lung
            label[18:22, 18:22, z] = 1
            image[label > 0] = 0.75
            items.append({"image": _meta_tensor(image), "label": _meta_tensor(label)})
        t = scripts.HardNegativeIndicesd("label", image_threshold=0.3, attached_threshold=0.3, attached_weight=2)
        ds = CacheDataset(items, transform=t, cache_rate=1.0, progress=False)
        assert [int(ds[i]["label_n_attached"]) for i in range(4)] == [1, 0, 0, 0]
        assert scripts.attached_scan_sampler(ds, 1.0) is None  # default: plain shuffling
        sampler = scripts.attached_scan_sampler(ds, 6.0)
        assert len(sampler) == 4
        torch.manual_seed(0)
        draws = np.array([i for _ in range(500) for i in sampler])
        share = (draws == 0).mean()  # expected 6 / (6 + 3) = 0.67 (0.25 unweighted)
        assert 0.6 < share < 0.73, share
        uncached = CacheDataset(items, transform=t, cache_rate=0.5, progress=False)
        with pytest.raises(ValueError, match="cache_rate 1.0"):
            scripts.attached_scan_sampler(uncached, 6.0)
        with pytest.raises(ValueError, match="single-process only"):
            scripts.sampling.require_unweighted_scans(2)
        # the scan weight alone (attached_weight left at 1) still finds the attached scan
        t1 = scripts.HardNegativeIndicesd("label", image_threshold=0.3, attached_threshold=0.3)
        assert [int(t1(it)["label_n_attached"]) for it in items] == [1, 0, 0, 0]
        # train.json measures shells only when one of the two weights asks for it
        from monai.bundle import ConfigParser

        for weights, measured in [((1, 1), False), ((1, 5), True), ((3, 1), True)]:
            parser = ConfigParser()
            parser.read_config(str(BUNDLE / "configs" / "train.json"))
            parser["attached_weight"], parser["attached_scan_weight"] = weights
            hn = next(
                t
                for t in parser.get_parsed_content("train#deterministic_transforms")
                if isinstance(t, scripts.HardNegativeIndicesd)
            )
            assert (hn.attached_threshold is not None) is measured, weights


def _foreground_auc(ckpt: Path | None, image: Path, label: Path) -> float:
    """ROC AUC of the network's voxel probabilities for nodule vs background on one whole (cropped) scan."""
    from monai.bundle import ConfigParser
    from sklearn.metrics import roc_auc_score

    with bundle_scripts(BUNDLE):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/train.json"))
        parser["device"] = "$torch.device('cpu')"
        parser["infer_roi_size"] = FAST["infer_roi_size"]
        net = parser.get_parsed_content("network_def")
        if ckpt is not None:
            net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        data = parser.get_parsed_content("preprocessing")({"image": str(image), "label": str(label)})
        inferer = parser.get_parsed_content("inferer")
        torch.manual_seed(0)
        with torch.no_grad():
            prob = torch.sigmoid(inferer(data["image"][None], net.eval()))[0, 0].numpy()
    lab = data["label"][0].numpy() > 0
    assert lab.shape == prob.shape and lab.any()
    return float(roc_auc_score(lab.ravel(), prob.ravel()))


@pytest.fixture(scope="module")
def trained(tiny_luna, tmp_path_factory) -> Path:
    """A short training run of train.json on the cropped demo cases (held-out fold 0); returns its folder."""
    out = tmp_path_factory.mktemp("nodule_train")
    run_bundle(
        BUNDLE, ["configs/train.json"], dataset_dir=str(tiny_luna), epochs=8, val_interval=8, warmup_epochs=1,
        learning_rate=0.005, ckpt_dir=str(out / "models"), output_dir=str(out / "eval"), **FAST,
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_short_training_beats_untrained_on_held_out_scan(trained, tiny_luna):
    """A short train.json run separates nodule from background voxels on the held-out scan better than the untrained network."""
    assert (trained / "models/model.pt").is_file()
    assert list((trained / "eval/tensorboard").glob("events.out.tfevents.*"))
    item = next(it for it in json.loads((tiny_luna / "datalist.json").read_text())["training"] if it["fold"] == 0)
    image, label = tiny_luna / item["image"], tiny_luna / item["label"]
    torch.manual_seed(0)
    untrained = _foreground_auc(None, image, label)
    learned = _foreground_auc(trained / "models/model.pt", image, label)
    assert learned > max(untrained + 0.05, 0.75), (untrained, learned)


@pytest.mark.slow
def test_evaluate_and_inference_write_metrics_masks_and_tables(trained, tiny_luna, tmp_path):
    """evaluate.json writes metrics/nodule/candidate CSVs; inference.json writes a mask in the input's geometry and a nodule table."""
    run_bundle(
        BUNDLE, ["configs/train.json", "configs/evaluate.json"], dataset_dir=str(tiny_luna), ckpt_dir=str(trained / "models"),
        output_dir=str(tmp_path / "eval"), infer_roi_size=FAST["infer_roi_size"],
    )  # fmt: skip
    with open(tmp_path / "eval/metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["scans"]) == 1 and int(row["nodules"]) >= 1
    assert {"scan_dice", "nodule_dice_ge_5mm", "sensitivity@0.125", "sensitivity@8", "cpm"} <= set(row)
    assert 0.0 <= float(row["cpm"]) <= 1.0
    with open(tmp_path / "eval/nodule_metrics.csv") as f:
        nodules = list(csv.DictReader(f))
    assert len(nodules) == int(row["nodules"]) and all(0.0 <= float(n["dice"]) <= 1.0 for n in nodules)

    item = next(it for it in json.loads((tiny_luna / "datalist.json").read_text())["training"] if it["fold"] == 0)
    image = tiny_luna / item["image"]
    run_bundle(
        BUNDLE, ["configs/inference.json"], input_path=str(image), ckpt_dir=str(trained / "models"),
        output_dir=str(tmp_path / "pred"), infer_roi_size=FAST["infer_roi_size"], threshold=0.3, tta=True, tta_flip_axes=[0, 1],
    )  # fmt: skip
    (mask_file,) = list((tmp_path / "pred").glob("*_nodules.nii.gz"))
    src, mask = nib.load(image), nib.load(mask_file)
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    header = (tmp_path / "pred/nodules.csv").read_text().splitlines()[0]
    assert header.startswith("case_id")
    if np.asarray(mask.dataobj).any():
        for col in (
            "centre_x_mm",
            "centre_y_mm",
            "centre_z_mm",
            "volume_mm3",
            "equivalent_diameter_mm",
            "mean_probability",
        ):
            assert col in header


def _phantom_ct(size: int = 64, seed: int = 0, nodule: bool = True) -> np.ndarray:
    """A 1 mm chest-like int16 HU volume ``(z, y, x)``: soft-tissue body, a lung, a 10 mm solid nodule in it or none."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:size, :size, :size]
    c = (size - 1) / 2
    hu = np.full((size, size, size), -1000.0)
    hu[:, 4:-4, 4:-4] = 40.0
    hu[((x - c) / (0.35 * size)) ** 2 + ((y - c) / (0.35 * size)) ** 2 + ((z - c) / (0.45 * size)) ** 2 <= 1] = -850.0
    if nodule:
        hu[(x - c - 4) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= 25] = 40.0
    return np.rint(hu + rng.normal(0, 15, hu.shape)).astype(np.int16)


def _write_ct(vol: np.ndarray, path: Path, origin=(-30.0, -40.0, 100.0)) -> Path:
    """Write a ``(z, y, x)`` HU volume at 1 mm: NIfTI/MetaImage/NRRD by suffix, else a DICOM series folder."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    from tests.conftest import write_ct_slice

    if not path.name.endswith((".nii.gz", ".nii", ".mha", ".nrrd")):
        uid = generate_uid()
        for k, sl in enumerate(vol):
            write_ct_slice(path / f"{k:03d}.dcm", sl.astype(np.int32) + 1024, origin[2] + k, series_uid=uid,
                           origin_xy=origin[:2], instance=k + 1)  # fmt: skip
        return path
    img = sitk.GetImageFromArray(vol)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_inputs_are_expanded_and_named(tmp_path, make_series):
    """A file is one input, a DICOM folder one, other folders give scans and series (sorted, no .raw); named."""
    make_series("scans/1.2.840.99", n=3)
    make_series("series_only", n=3)
    scans = tmp_path / "scans"
    for name in ("b.mha", "a.nii.gz", "c.mhd", "c.raw", "d.nrrd", "notes.txt"):
        (scans / name).write_bytes(b"x")
    (scans / "no_dicom").mkdir()
    (scans / "no_dicom" / "readme.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with bundle_scripts(BUNDLE) as scripts:
        inputs = scripts.inputs.expand_inputs(str(scans))
        assert [Path(p).name for p in inputs] == ["1.2.840.99", "a.nii.gz", "b.mha", "c.mhd", "d.nrrd"]
        assert [scripts.input_id(p) for p in inputs] == ["1.2.840.99", "a", "b", "c", "d"]
        assert scripts.input_id("/x/1.3.6.1.nii.gz") == "1.3.6.1"
        assert scripts.inputs.expand_inputs(tmp_path / "series_only") == [str(tmp_path / "series_only")]
        assert scripts.inputs.expand_inputs(str(scans / "b.mha")) == [str(scans / "b.mha")]
        as_string = f"['{scans / 'a.nii.gz'}', '{tmp_path / 'missing.nii.gz'}', '{tmp_path / 'series_only'}']"
        expected = [str(scans / "a.nii.gz"), str(tmp_path / "missing.nii.gz"), str(tmp_path / "series_only")]
        assert scripts.inputs.expand_inputs(as_string) == expected  # a missing item of a list is refused later
        with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz: no such file"):
            scripts.inputs.expand_inputs(str(tmp_path / "missing.nii.gz"))
        with pytest.raises(FileNotFoundError, match=r"empty: no image file"):
            scripts.inputs.expand_inputs(str(tmp_path / "empty"))


def test_mha_nrrd_and_dicom_series_load_like_nifti(tmp_path):
    """inference.json reads .mha, .nrrd and DICOM series as NIfTI: same HU array, same world affine."""
    from monai.bundle import ConfigParser

    vol = _phantom_ct(24)
    paths = [_write_ct(vol, tmp_path / name) for name in ("ct.nii.gz", "ct.mha", "ct.nrrd", "ct_dicom")]
    with bundle_scripts(BUNDLE):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        load = parser.get_parsed_content("preprocessing").transforms[0]
        loaded = [load({"image": str(p)})["image"] for p in paths]
    ref = loaded[0]
    assert ref.shape == (1, 24, 24, 24) and float(ref.min()) < -900
    for path, img in zip(paths[1:], loaded[1:]):
        assert img.shape == ref.shape, path
        torch.testing.assert_close(img.as_tensor(), ref.as_tensor(), msg=str(path))
        np.testing.assert_allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=1e-4, err_msg=str(path))


@pytest.mark.slow
def test_inference_on_a_folder_writes_one_agreeing_output_per_format(tmp_path):
    """A folder of one scan as .nii.gz, .mha and DICOM series gives one mask and table per input, named, all equal."""
    vol = _phantom_ct(64)
    folder = tmp_path / "scans"
    for name in ("ct_nifti.nii.gz", "ct_meta.mha", "1.2.826.0.1.3680043"):  # a DICOM folder named like a series UID
        _write_ct(vol, folder / name)
    run_bundle(BUNDLE, ["configs/inference.json"], input_path=str(folder), output_dir=str(tmp_path / "pred"))
    names = ["1.2.826.0.1.3680043", "ct_meta", "ct_nifti"]
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz")) == [f"{n}_nodules.nii.gz" for n in names]
    masks = [np.asarray(nib.load(tmp_path / "pred" / f"{n}_nodules.nii.gz").dataobj) for n in names]
    assert masks[0].shape == (64, 64, 64) and masks[0].sum() > 100  # the 10 mm nodule is found
    for n, m in zip(names[1:], masks[1:]):
        np.testing.assert_array_equal(m, masks[0], err_msg=n)
    with open(tmp_path / "pred" / "nodules.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case_id"] for r in rows} == set(names)
    tables = {n: [{k: v for k, v in r.items() if k != "case_id"} for r in rows if r["case_id"] == n] for n in names}
    assert tables["ct_nifti"] and tables["ct_meta"] == tables["ct_nifti"] == tables["1.2.826.0.1.3680043"]


def _write_bad_scan(kind: str, folder: Path) -> Path:
    """A scan the bundle must refuse: ``2d``, ``4d`` (3 volumes), ``all_air`` or ``all_nan`` (40 x 40 x 40 at 1 mm)."""
    path = folder / f"{kind}.nii.gz"
    if kind == "2d":
        nib.save(nib.Nifti1Image(np.zeros((40, 40), np.int16), np.eye(4)), path)
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.zeros((40, 40, 20, 3), np.int16), np.eye(4)), path)
    elif kind == "all_air":
        _write_ct(np.full((40, 40, 40), -1000, np.int16), path)
    else:
        _write_ct(np.full((40, 40, 40), np.nan, np.float32), path)
    return path


BAD_SCANS = {
    "2d": r"image of shape \(1, 40, 40\) \(channel first\) is not a 3D CT volume",
    "4d": r"image of shape \(3, 40, 40, 20\) \(channel first\) is not a 3D CT volume",
    "all_air": r"no voxel above -500 HU \(the config's body_hu\): an empty or all-air scan",
    "all_nan": r"all 64000 voxels are NaN or infinite",
}


@pytest.mark.parametrize("kind", list(BAD_SCANS))
def test_a_bad_scan_is_refused_in_one_line_naming_it(tmp_path, caplog, kind):
    """A 2D, 4D, all-air or all-NaN scan is refused by the inference preprocessing: one line ``<input>: <problem>``."""
    import logging

    from monai.bundle import ConfigParser

    path = _write_bad_scan(kind, tmp_path)
    with bundle_scripts(BUNDLE) as scripts:
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        ds = scripts.InputDataset([{"image": str(path)}], transform=parser.get_parsed_content("preprocessing"))
        with caplog.at_level(logging.ERROR, logger="scripts.inputs"):
            assert list(ds) == []  # before: an all-air scan went on as a 0 x 0 x 0 crop, an all-NaN one as NaN
    assert ds.failed == [str(path)]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "scripts.inputs"]
    assert re.match(re.escape(f"{path}: ") + BAD_SCANS[kind], line) and "\n" not in line, line


def test_nan_voxels_are_read_as_air_with_a_warning_or_refused_by_switch(tmp_path, caplog):
    """NaN/inf voxels reach the network as air (-1000 HU), counted in a warning naming the file; 'raise' refuses."""
    import logging

    from monai.bundle import ConfigParser

    vol = _phantom_ct(40).astype(np.float32)
    vol[0:5, 2:12, 2:12] = np.nan  # 500 voxels
    vol[39, 0, 0:3] = [np.inf, -np.inf, np.inf]
    path = _write_ct(vol, tmp_path / "holes.nii.gz")
    with bundle_scripts(BUNDLE) as scripts:
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        with caplog.at_level(logging.WARNING, logger="scripts.transforms"):
            image = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"]
        assert torch.isfinite(image).all()  # before: the NaN went on to the network
        assert int(image.meta["non_finite_voxels"]) == 503
        raw = scripts.LoadScand("image", ensure_channel_first=True, image_only=True)({"image": str(path)})
        aired = scripts.NonFiniteToAird("image")(raw)["image"]
        assert (aired[0].numpy().transpose(2, 1, 0)[~np.isfinite(vol)] == -1000).all()
        assert np.array_equal(aired[0].numpy().transpose(2, 1, 0)[np.isfinite(vol)], vol[np.isfinite(vol)])
        parser["non_finite"] = "raise"
        ds = scripts.InputDataset([{"image": str(path)}], transform=parser.get_parsed_content("preprocessing"))
        assert list(ds) == [] and ds.failed == [str(path)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "scripts.transforms"]
    share = f"{path}: 503 of 64000 voxels (0.79 %) are NaN or infinite"
    # twice: the config's preprocessing, then the transform alone
    assert warnings == [f"{share}; set to air (-1000 HU), nodules there cannot be found"] * 2
    refused = [r.getMessage() for r in caplog.records if r.name == "scripts.inputs"]
    assert refused == [f"{share}; set the config key `non_finite` to 'air' to read them as air"]


@pytest.mark.slow
def test_a_nan_block_away_from_the_nodule_leaves_it_found(tmp_path):
    """A block of NaN voxels far from the nodule: the clean scan's mask (it used to be empty, exit 0)."""
    vol = _phantom_ct(64)
    holed = vol.astype(np.float32)
    holed[0:10, 6:30, 6:30] = np.nan  # 5760 voxels at the scan's corner; the nodule is at its centre
    folder = tmp_path / "scans"
    _write_ct(vol, folder / "clean.nii.gz"), _write_ct(holed, folder / "holed.nii.gz")
    proc = run_bundle(BUNDLE, ["configs/inference.json"], input_path=str(folder), output_dir=str(tmp_path / "pred"))
    clean, holed = (np.asarray(nib.load(tmp_path / f"pred/{n}_nodules.nii.gz").dataobj) > 0 for n in ("clean", "holed"))
    assert clean.sum() > 100 and 2 * (clean & holed).sum() / (clean.sum() + holed.sum()) > 0.95
    warning = f"{folder / 'holed.nii.gz'}: 5760 of 262144 voxels (2.2 %) are NaN or infinite; set to air"
    assert warning in proc.stdout + proc.stderr
    with open(tmp_path / "pred/scans.csv") as f:
        scans = {r["case_id"]: r for r in csv.DictReader(f)}
    assert (scans["clean"]["non_finite_voxels"], scans["holed"]["non_finite_voxels"]) == ("0", "5760")
    assert scans["clean"]["nodules"] == scans["holed"]["nodules"] == "1"


class _Engine:
    """What NoduleTableWriter reads of an ignite engine: ``state.output``, a list of output items."""

    def __init__(self, items: list[dict]) -> None:
        self.state = type("State", (), {"output": items})()


def _table_item(path: str, volumes: list[float], non_finite: int = 0) -> dict:
    from monai.data import MetaTensor

    image = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": path, "non_finite_voxels": non_finite})
    return {"image": image, "nodules": [{"nodule": i + 1, "volume_mm3": v} for i, v in enumerate(volumes)]}


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_tables_keep_earlier_runs_and_replace_the_rows_of_a_rerun_scan(tmp_path):
    """The tables keep earlier runs' rows, replace (never repeat) a rerun scan's, have a full header with no nodule."""
    out = tmp_path / "pred"
    with bundle_scripts(BUNDLE) as scripts:
        columns = ["case_id", *scripts.transforms.NODULE_COLUMNS]
        first = scripts.NoduleTableWriter(str(out))  # a run on one scan without any nodule
        first.iteration_completed(_Engine([_table_item("/d/clear.nii.gz", [])]))
        header, rows = _read_csv(out / "nodules.csv")
        assert header == columns and rows == []  # before: the header was case_id alone
        second = scripts.NoduleTableWriter(str(out))  # a later run into the same folder
        second.iteration_completed(_Engine([_table_item("/d/a.nii.gz", [500.0, 40.0], non_finite=12)]))
        second.iteration_completed(_Engine([_table_item("/d/b.mha", [90.0])]))
        third = scripts.NoduleTableWriter(str(out))  # a rerun of a.nii.gz, which now finds one nodule
        third.iteration_completed(_Engine([_table_item("/e/a.nii.gz", [480.0])]))
        header, rows = _read_csv(out / "nodules.csv")
        assert header == columns
        assert [(r["case_id"], r["nodule"], r["volume_mm3"]) for r in rows] == [("b", "1", "90.0"), ("a", "1", "480.0")]
        header, scans = _read_csv(out / "scans.csv")
        assert header == ["case_id", "input", "nodules", "non_finite_voxels"]
        assert [tuple(r.values()) for r in scans] == [
            ("clear", "/d/clear.nii.gz", "0", "0"),
            ("b", "/d/b.mha", "1", "0"),
            ("a", "/e/a.nii.gz", "1", "0"),
        ]
        assert sorted(p.name for p in out.iterdir()) == ["nodules.csv", "scans.csv"]  # no temporary file left
        (tmp_path / "other").mkdir()
        (tmp_path / "other/nodules.csv").write_text("patient,finding\np1,none\n")  # someone else's table: not replaced
        with pytest.raises(SystemExit, match=r"other/nodules\.csv: exists but is not a table of this bundle"):
            scripts.NoduleTableWriter(str(tmp_path / "other"))
        assert (tmp_path / "other/nodules.csv").read_text() == "patient,finding\np1,none\n"


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_keeps_the_first_runs_rows(tmp_path):
    """Two runs into one output_dir: the first run's rows stay, a rerun scan's appear once, a clear scan is listed."""
    vol = _phantom_ct(48)
    for name in ("a.nii.gz", "c.nii.gz"):
        _write_ct(vol, tmp_path / name)
    _write_ct(_phantom_ct(48, nodule=False), tmp_path / "clear.mha")
    out = str(tmp_path / "pred")
    inputs = json.dumps([str(tmp_path / "a.nii.gz"), str(tmp_path / "c.nii.gz")])
    run_bundle(BUNDLE, ["configs/inference.json"], input_path=inputs, output_dir=out)
    _, first = _read_csv(tmp_path / "pred/nodules.csv")
    assert sorted(r["case_id"] for r in first) == ["a", "c"]  # one nodule each
    inputs = json.dumps([str(tmp_path / "clear.mha"), str(tmp_path / "a.nii.gz")])
    run_bundle(BUNDLE, ["configs/inference.json"], input_path=inputs, output_dir=out)
    _, rows = _read_csv(tmp_path / "pred/nodules.csv")
    # c: before, its rows were gone while its mask stayed
    assert [r for r in rows if r["case_id"] == "c"] == [r for r in first if r["case_id"] == "c"]
    assert [r for r in rows if r["case_id"] == "a"] == [r for r in first if r["case_id"] == "a"]  # once, not twice
    assert len(rows) == 2
    _, scans = _read_csv(tmp_path / "pred/scans.csv")
    assert {r["case_id"]: r["nodules"] for r in scans} == {"a": "1", "c": "1", "clear": "0"}
    masks = sorted(p.name for p in (tmp_path / "pred").glob("*_nodules.nii.gz"))
    assert masks == ["a_nodules.nii.gz", "c_nodules.nii.gz", "clear_nodules.nii.gz"]


def _bad_checkpoint(kind: str, path: Path) -> None:
    """Write a ``model.pt`` that is not the config's network weights."""
    from monai.networks.nets import UNet

    path.parent.mkdir(parents=True, exist_ok=True)
    shipped = (BUNDLE / "models/model.pt").read_bytes()
    if kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "truncated":
        path.write_bytes(shipped[: len(shipped) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other_network":
        torch.save(UNet(3, 1, 1, (4, 8), (2,)).state_dict(), path)
    elif kind == "other_channels":
        with bundle_scripts(BUNDLE) as scripts:
            net = scripts.DeepSupervisionAttentionUnet(channels=(4, 8, 16, 32), strides=(2, 2, 2))
            torch.save(net.state_dict(), path)
    elif kind == "needs_code":
        torch.save({"model": _NeedsCode()}, path)


class _NeedsCode:
    """Unpickling calls ``print``: a file that only loads with weights_only=False (harmless here)."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


BAD_CHECKPOINTS = {
    "tensor": "holds a Tensor, not a plain state dict",
    "list": "holds a list, not a plain state dict",
    "truncated": "truncated or corrupt (not a complete PyTorch zip archive)",
    "empty": "empty file (0 bytes), not a checkpoint",
    "other_network": "not the weights of network_def (",
    "other_channels": "model.0.conv.0.conv.weight has shape (4, 1, 3, 3, 3), network_def's (8, 1, 3, 3, 3)",
    "needs_code": "a pickle that needs code to load (print); weights are loaded with weights_only=True",
    "missing": "checkpoint not found",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_in_one_line_naming_it(tmp_path, kind, capsys):
    """A model.pt: a tensor, a list, truncated, empty, another network's, a pickle needing code, missing: named."""
    from monai.bundle import ConfigParser

    _bad_checkpoint(kind, tmp_path / "models/model.pt")
    with bundle_scripts(BUNDLE):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        parser["ckpt_dir"] = str(tmp_path / "models")
        parser["input_path"] = str(tmp_path)
        with pytest.raises(SystemExit) as err:  # before: made without looking at the file; failed later, deep in MONAI
            parser.get_parsed_content("handlers")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'models/model.pt'}: {BAD_CHECKPOINTS[kind]}"), message
    assert "\n" not in message
    assert "unpickled code ran" not in capsys.readouterr().out


def test_the_shipped_checkpoint_loads_through_the_checked_loader():
    """inference.json's checkpoint loader puts models/model.pt into the network unchanged."""
    from monai.bundle import ConfigParser

    with bundle_scripts(BUNDLE):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs/inference.json"))
        parser["device"] = "$torch.device('cpu')"
        parser["ckpt_dir"] = str(BUNDLE / "models")
        loader = parser.get_parsed_content("handlers")[0]
        loader(None)
        net = parser.get_parsed_content("network")
    shipped = torch.load(BUNDLE / "models/model.pt", weights_only=True)
    assert set(net.state_dict()) == set(shipped)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in shipped.items())


def test_inference_with_a_bad_checkpoint_stops_with_one_line(tmp_path):
    """inference.json with a model.pt holding a tensor exits 1 with one line naming it, no traceback, no output."""
    _bad_checkpoint("tensor", tmp_path / "models/model.pt")
    _write_ct(_phantom_ct(24), tmp_path / "ct.nii.gz")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--input_path", str(tmp_path / "ct.nii.gz"), "--ckpt_dir", str(tmp_path / "models"),
           "--output_dir", str(tmp_path / "pred")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'models/model.pt'}: holds a Tensor, not a plain state dict (parameter names -> tensors)"
    ), log[-3000:]
    assert "Traceback" not in log and not list((tmp_path / "pred").iterdir())


@pytest.mark.slow
def test_bad_inputs_in_a_list_are_refused_by_name_and_the_others_written(tmp_path):
    """Bad items of a list (unreadable .mha, 2D, 4D, all-air, all-NaN) are refused by name in one line; others go on."""
    vol = _phantom_ct(40)
    good = [_write_ct(vol, tmp_path / "first.nii.gz"), _write_ct(vol[::-1].copy(), tmp_path / "last.mha")]
    broken = tmp_path / "broken.mha"
    broken.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4\nElementDataFile = nowhere.raw\n")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40), np.int16), np.eye(4)), flat)
    more = [_write_bad_scan(kind, tmp_path) for kind in ("4d", "all_air", "all_nan")]
    inputs = [str(good[0]), str(broken), str(flat), *map(str, more), str(good[1])]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--input_path", json.dumps(inputs), "--output_dir", str(tmp_path / "pred")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    written = sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz"))
    assert written == ["first_nodules.nii.gz", "last_nodules.nii.gz"], log[-3000:]
    lines = log.splitlines()
    assert any(f"{broken}: cannot be read as an image" in ln for ln in lines), log[-3000:]
    assert any(f"{flat}: image of shape (1, 40, 40)" in ln and "not a 3D CT volume" in ln for ln in lines), log[-3000:]
    for path in more:
        kind = path.name[: -len(".nii.gz")]
        assert any(re.search(re.escape(f"{path}: ") + BAD_SCANS[kind], ln) for ln in lines), (kind, log[-3000:])
    failed = ", ".join(map(str, [broken, flat, *more]))
    assert proc.stderr.strip().splitlines()[-1] == f"5 of 7 inputs failed (see the log): {failed}"
    assert "Traceback" not in log  # one line per refused input and one at the end, no traceback


def test_verify_net_in_out_and_ckpt_export(tmp_path):
    """verify_net_in_out passes on the config's network, and ckpt_export writes a TorchScript file that matches the eager network."""
    env = {**os.environ, "PYTHONPATH": ""}
    common = ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", *common, "--n", "2"],
        cwd=BUNDLE,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ts_path = tmp_path / "model.ts"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts_path), "--ckpt_file", "models/model.pt", *common],
        cwd=BUNDLE, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    extra = {"metadata.json": ""}
    ts = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "nodule"
    }
    with bundle_scripts(BUNDLE) as scripts:
        net = scripts.DeepSupervisionAttentionUnet(channels=(8, 16, 32, 64), strides=(2, 2, 2))
    net.load_state_dict(torch.load(BUNDLE / "models/model.pt", weights_only=True))
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net.eval()(x))


def test_bundle_folder_alone_loads_and_predicts(tmp_path):
    """The bundle folder copied alone (no repo on the path) parses, runs pre/net/post on a scan, and its model.ts loads with metadata."""
    folder = tmp_path / "lung_nodule_ct_segmentation"
    shutil.copytree(BUNDLE, folder, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    scan = tmp_path / "ct.nii.gz"
    hu = np.full((48, 40, 20), -850, np.int16)
    hu[20:26, 18:24, 8:13] = 40  # a small solid "nodule" in lung-like air
    nib.save(nib.Nifti1Image(hu, np.diag([-0.8, -0.8, 1.5, 1.0])), scan)
    code = textwrap.dedent(f"""
        import json, os, torch
        from monai.bundle import ConfigParser
        p = ConfigParser()
        p.read_config("configs/inference.json")
        p["device"] = "$torch.device('cpu')"
        p["infer_roi_size"] = [64, 64, 32]
        net = p.get_parsed_content("network")
        import scripts
        assert scripts.__file__.startswith(os.getcwd()), scripts.__file__
        net.load_state_dict(torch.load("models/model.pt", map_location="cpu", weights_only=True))
        data = p.get_parsed_content("preprocessing")({{"image": {str(scan)!r}}})
        with torch.no_grad():
            data["pred"] = p.get_parsed_content("inferer")(data["image"][None], net.eval())[0]
        post = p.get_parsed_content("postprocessing")
        post.transforms = tuple(t for t in post.transforms if type(t).__name__ != "SaveImaged")
        out = post(data)
        assert tuple(out["pred"].shape[1:]) == (48, 40, 20), out["pred"].shape
        assert isinstance(out["nodules"], list)
        extra = {{"metadata.json": ""}}
        ts = torch.jit.load("models/model.ts", _extra_files=extra)
        assert json.loads(extra["metadata.json"])["version"]
        assert ts(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
        print("OK")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.long
def test_torchrun_two_processes_cpu(tiny_luna, tmp_path):
    """torchrun --nproc_per_node=2 with multi_gpu_train.json trains one short epoch on CPU (gloo, DistributedSampler) to a checkpoint,
    and each rank frees its DDP wrapper before the interpreter shuts down."""
    torchrun = Path(sys.executable).with_name("torchrun")
    files = json.dumps(
        [
            str(BUNDLE / "configs/train.json"),
            str(BUNDLE / "configs/multi_gpu_train.json"),
            ddp_release_probe(BUNDLE, tmp_path),
        ]
    )
    cmd = [str(torchrun), "--nproc_per_node=2", "--tee=3", "--master_port=29547", "-m", "monai.bundle", "run", "--config_file", files, "--dataset_dir", str(tiny_luna),
           "--epochs", "1", "--val_interval", "1", "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    for key, value in FAST.items():
        cmd += [f"--{key}", json.dumps(value)]
    proc = subprocess.run(
        cmd,
        cwd=BUNDLE,
        env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    sd = torch.load(tmp_path / "models/model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd) and "deep_supervision_heads.0.weight" in sd
    assert_ddp_released_before_exit(proc.stdout)
