"""Data lists of the lung-field bundle from a ``data_prep`` output folder (``datalist.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["load_datalist"]


def load_datalist(
    dataset_dir: str,
    label_key: str = "lung",
    folds: Sequence[int] | int | None = None,
    exclude_folds: Sequence[int] | int | None = None,
    datalist: str | None = None,
) -> list[dict]:
    """Items ``{"image", "label", "case_id"}`` of a ``data_prep`` folder, paths made absolute.

    Args:
        dataset_dir: folder written by ``python -m data_prep lidc`` (``images/``, ``labels/``, ``datalist.json``).
        label_key: the datalist key used as this bundle's ``label``. Default ``"lung"`` (the lung mask;
            ``"label"`` there is the nodule mask).
        folds: keep only these folds; ``None`` or ``-1`` keeps all. Default None.
        exclude_folds: drop these folds (training: the validation fold); ``None`` or ``-1`` drops none.
            Default None.
        datalist: the datalist file. Default ``<dataset_dir>/datalist.json``.

    Returns:
        One dict per case, in the datalist's order.
    """
    path = datalist or os.path.join(dataset_dir, "datalist.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no datalist at {path}: point --dataset_dir at a data_prep output folder")
    with open(path) as f:
        items = json.load(f)["training"]

    def _set(v):
        if v is None:
            return None
        v = [v] if isinstance(v, int) else list(v)
        return None if -1 in v else set(v)

    keep, drop = _set(folds), _set(exclude_folds)
    out = []
    for it in items:
        if label_key not in it:
            raise KeyError(f"{path}: item {it.get('case_id', it['image'])} has no '{label_key}' key")
        fold = int(it.get("fold", 0))
        if (keep is not None and fold not in keep) or (drop is not None and fold in drop):
            continue
        out.append(
            {
                "image": os.path.join(dataset_dir, it["image"]),
                "label": os.path.join(dataset_dir, it[label_key]),
                "case_id": it.get("case_id", os.path.basename(it["image"]).split(".")[0]),
            }
        )
    return out
