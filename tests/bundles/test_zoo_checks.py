"""The MONAI Model Zoo's own checks (``ci/verify_bundle.py`` and the bundle properties), run on each bundle as its CI does.

Each bundle is copied alone into a temporary folder (as a zip of it would be unpacked) and checked in
a fresh Python process started in that folder, with MONAI's defaults: ``verify_net_in_out`` with
``net_id="network_def"``, ``configs/inference.json`` and the default ``n``/``p``/``any`` (batch 1);
``ckpt_export`` of ``models/model.pt``; ``models/model.ts`` loads; every required train and inference
property of MONAI's ``TrainProperties``/``InferProperties`` has its config ID, and optional ones are
referenced by the right ID (what ``ConfigWorkflow.check_properties`` checks, without instantiating the data).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
# The Zoo's longest bundle README is 292 lines; the project keeps to about 250.
MAX_README_LINES = 260
MAX_CHANGELOG_CHARS = 100

CHECKS = r"""
import json, sys, torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.utils import BundleProperty, BundlePropertyConfig

verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json")
print("verify_net_in_out: ok")
ckpt_export(net_id="network_def", filepath="models/verify_model.ts", ckpt_file="models/model.pt",
            meta_file="configs/metadata.json", config_file="configs/inference.json")
torch.jit.load("models/verify_model.ts")
torch.jit.load("models/model.ts")
print("ckpt_export: ok")
missing = {}
for config, kind in (("configs/train.json", "train"), ("configs/inference.json", "infer")):
    workflow = ConfigWorkflow(config_file=config, meta_file="configs/metadata.json", logging_file=False, workflow_type=kind)
    # check_properties() itself needs the dataset present (it instantiates each property); the Zoo's
    # question is whether each required property's config ID exists and each optional one that the
    # workflow references is referenced by its own ID (ConfigWorkflow._check_optional_id, "#" == "::").
    parser = workflow.parser
    norm = lambda v: v.replace("::", "#") if isinstance(v, str) else v
    missing[kind] = [n for n, p in workflow.properties.items() if p.get(BundleProperty.REQUIRED) and p[BundlePropertyConfig.ID] not in parser]
    for n, p in workflow.properties.items():
        ref_id = p.get(BundlePropertyConfig.REF_ID)
        if p.get(BundleProperty.REQUIRED) or ref_id is None:
            continue
        if n in ("evaluator", "val_interval"):
            handlers = parser.get("train#handlers", [])
            refs = [h.get(ref_id) for h in handlers if isinstance(h, dict) and h.get("_target_") == "ValidationHandler"] if isinstance(handlers, list) else []
        else:
            refs = [parser.get(ref_id, None)]
        for ref in refs:
            if isinstance(ref, str) and not ref.startswith("$") and norm(ref) != "@" + norm(p[BundlePropertyConfig.ID]):
                missing[kind].append(n)
print("MISSING=" + json.dumps(missing))
"""


@pytest.fixture(scope="module", params=BUNDLES)
def bundle_copy(request, tmp_path_factory) -> Path:
    """One bundle folder copied alone, without the rest of the repository."""
    dst = tmp_path_factory.mktemp("zoo") / request.param
    shutil.copytree(REPO / "bundles" / request.param, dst, ignore=shutil.ignore_patterns("__pycache__", "eval", "logs"))
    return dst


def test_bundle_files_and_metadata_follow_the_zoo(bundle_copy):
    """LICENSE, docs/README.md (about 250 lines at most), docs/data_license.txt, and metadata whose version has a one-line changelog entry."""
    for name in ("LICENSE", "docs/README.md", "docs/data_license.txt", "configs/inference.json", "configs/train.json"):
        assert (bundle_copy / name).is_file(), f"{bundle_copy.name}: {name} is missing"
    readme = (bundle_copy / "docs" / "README.md").read_text().splitlines()
    assert len(readme) <= MAX_README_LINES, f"{bundle_copy.name}: docs/README.md has {len(readme)} lines"
    assert "LIDC-IDRI" in (bundle_copy / "docs" / "data_license.txt").read_text()
    meta = json.loads((bundle_copy / "configs" / "metadata.json").read_text())
    for key in (
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "name",
        "task",
        "description",
        "authors",
        "copyright",
        "license",
    ):
        assert key in meta, f"{bundle_copy.name}: metadata.json has no {key!r}"
    assert meta["version"] in meta["changelog"]
    for version, entry in meta["changelog"].items():
        assert "\n" not in entry and len(entry) <= MAX_CHANGELOG_CHARS, (
            f"{bundle_copy.name} {version}: changelog entry of {len(entry)} characters"
        )
    for side in ("inputs", "outputs"):
        for key, spec in meta["network_data_format"][side].items():
            assert spec.get("channel_def"), f"{bundle_copy.name}: {side}.{key} has no channel_def"
    assert not any(
        p.suffix in {".txt", ".md"} and p.name not in {"README.md", "data_license.txt"}
        for p in (bundle_copy / "docs").iterdir()
    ), f"{bundle_copy.name}: docs/ holds more than the README and the data licence (histories live outside the bundle)"


@pytest.mark.slow
def test_zoo_verify_net_in_out_ckpt_export_and_properties(bundle_copy):
    """verify_net_in_out with MONAI's defaults, ckpt_export and model.ts load, and no required train/inference property is missing."""
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", CHECKS], cwd=bundle_copy, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (
        f"{bundle_copy.name}: the Zoo's checks fail:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MISSING="))
    missing = json.loads(line.removeprefix("MISSING="))
    assert missing == {"train": [], "infer": []}, f"{bundle_copy.name}: missing bundle properties {missing}"
