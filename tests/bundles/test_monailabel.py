"""The segmentation bundles served by a real MONAI Label server (its own venv), over HTTP on 127.0.0.1.

Opt-in (marker ``monailabel``; ``make test`` runs it after the default suite): it needs MONAI
Label's virtual environment, made by ``integration/monailabel/setup.sh`` (idempotent; the test
runs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.bundles.conftest import BUNDLES, REPO, run_bundle

pytestmark = pytest.mark.monailabel

# Bundles MONAI Label's monaibundle app serves (segmentation: the app's BundleInferTask/BundleTrainTask).
SERVED = os.environ.get("MONAILABEL_BUNDLES", "lung_field_ct_segmentation,lung_nodule_ct_segmentation").split(",")
TRAINED = "lung_field_ct_segmentation"  # the datastore's labels are lung masks: one-epoch training of this bundle
VENV = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))
APP_TEMPLATE = Path(os.environ.get("MONAILABEL_APP", REPO / ".monailabel" / "apps" / "monaibundle"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _post(url: str, body: dict | None = None, timeout: float = 900) -> bytes:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory, lidc_demo_prepared):
    """A MONAI Label server with the bundles copied into its app and demo CTs (+ lung masks) as studies."""
    setup = subprocess.run(["bash", str(REPO / "integration" / "monailabel" / "setup.sh"), str(VENV), str(APP_TEMPLATE)],
                           capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-4000:]
    root = tmp_path_factory.mktemp("monailabel")
    app = root / "app"
    shutil.copytree(APP_TEMPLATE, app)
    for name in SERVED:
        shutil.copytree(BUNDLES / name, app / "model" / name, ignore=shutil.ignore_patterns("eval", "__pycache__"))
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    datalist = json.loads((lidc_demo_prepared / "datalist.json").read_text())["training"]
    for item in datalist:
        shutil.copy(lidc_demo_prepared / item["image"], studies / Path(item["image"]).name)
        shutil.copy(lidc_demo_prepared / item["lung"], studies / "labels" / "final" / Path(item["image"]).name)
    port = _free_port()
    log = open(root / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": "", "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    proc = subprocess.Popen(
        [str(VENV / "bin" / "python"), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
         "--conf", "models", ",".join(SERVED), "--conf", "zoo_source", "github", "--conf", "sam2", "false",
         "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            info = json.loads(_get(f"{url}/info/"))
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("MONAI Label did not start:\n" + (root / "server.log").read_text()[-6000:])
            time.sleep(2)
    yield {
        "url": url,
        "info": info,
        "app": app,
        "studies": studies,
        "root": root,
        "datalist": datalist,
        "prepared": lidc_demo_prepared,
    }
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_info_lists_each_bundle_with_its_labels(server):
    """/info/ lists every served bundle as an infer model with the labels of its metadata's channel_def."""
    models = server["info"]["models"]
    for name in SERVED:
        assert name in models, f"{name} missing from /info/: {sorted(models)}"
        meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
        channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        expected = {v.lower() for v in channel_def.values() if v.lower() != "background"}
        assert set(models[name]["labels"]) == expected, (name, models[name]["labels"])
    assert TRAINED in server["info"]["trainers"]


@pytest.mark.parametrize("name", SERVED)
def test_infer_over_http_equals_the_bundles_own_inference(server, name, tmp_path):
    """/infer/<bundle> returns the same mask, in the input's geometry, as the bundle's own inference.json."""
    item = server["datalist"][-1]
    image_id = Path(item["image"]).name.replace(".nii.gz", "")
    answer = _post(f"{server['url']}/infer/{name}?image={image_id}&output=image", {"device": "cpu"})
    served_file = tmp_path / "served.nii.gz"
    served_file.write_bytes(answer)
    served = sitk.ReadImage(str(served_file))
    own_dir = tmp_path / "own"
    run_bundle(
        name, ["configs/inference.json"], input_path=str(server["prepared"] / item["image"]), output_dir=str(own_dir)
    )
    own_files = sorted(own_dir.rglob("*.nii.gz"))
    assert own_files, f"the bundle's inference wrote nothing under {own_dir}"
    own = sitk.ReadImage(str(own_files[0]))
    ref = sitk.ReadImage(str(server["prepared"] / item["image"]))
    assert served.GetSize() == ref.GetSize() == own.GetSize()
    np.testing.assert_allclose(served.GetSpacing(), ref.GetSpacing(), rtol=1e-4)
    a, b = sitk.GetArrayFromImage(served) > 0, sitk.GetArrayFromImage(own) > 0
    assert b.any(), f"{name}: the bundle's own inference found nothing in the demo CT"
    disagreement = np.logical_xor(a, b).sum() / max(1, np.logical_or(a, b).sum())
    assert disagreement < 1e-3, (
        f"{name}: MONAI Label's answer differs from the bundle's in {disagreement:.2%} of the union"
    )


def test_one_epoch_training_through_train_endpoint(server):
    """/train/<bundle> runs one epoch of the bundle's train.json on the datastore and writes a new checkpoint."""
    ckpt = server["app"] / "model" / TRAINED / "models" / "model.pt"
    before = ckpt.stat().st_mtime if ckpt.exists() else 0
    _post(f"{server['url']}/train/{TRAINED}?run_sync=true",
          {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "pretrained": True}, timeout=1800)  # fmt: skip
    assert ckpt.exists() and ckpt.stat().st_mtime > before, "training did not write the bundle's models/model.pt"
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and state, "the checkpoint is not a state dict"
