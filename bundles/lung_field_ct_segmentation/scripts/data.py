"""Data lists of the lung-field bundle from a ``data_prep`` output folder (``datalist.json``), and the cached
dataset of training and evaluation that refuses bad cases by name before anything runs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from monai.data import CacheDataset

__all__ = ["CheckedCacheDataset", "load_datalist"]

logger = logging.getLogger("lung_field_ct_segmentation")


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


def _case_line(item, err: BaseException) -> str:
    """One line for a case whose preprocessing raised ``err``: the innermost error, naming the case's file."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    paths = [str(v) for v in (item.values() if isinstance(item, dict) else [item]) if isinstance(v, str)]
    if any(text.startswith(f"{p}: ") for p in paths):
        return text
    return f"{paths[0] if paths else item}: {text}"


class CheckedCacheDataset(CacheDataset):
    """``monai.data.CacheDataset`` that stops with one line per bad case instead of a traceback.

    Caching (all cases when ``cache_rate`` is 1.0, the default) runs the deterministic transforms, whose
    ``scripts.CheckCTd`` and ``scripts.LoadCTd`` refuse bad input with the file named. Every case that fails
    is logged as one line ``<file>: <problem>``; then the run stops (``SystemExit``, status 1) with a one-line
    summary, before any training or evaluation: a model trained or scored on a silently smaller set would
    mislead. Arguments as ``CacheDataset``. A case outside the cache (``cache_rate`` below 1) fails when
    it is reached, with its one line logged first.
    """

    def set_data(self, data: Sequence) -> None:
        """As ``CacheDataset.set_data``; then stop naming the cases that could not be cached."""
        self._failed: list[tuple[str, str]] | None = []
        try:
            super().set_data(data)
        finally:
            failed, self._failed = self._failed, None
        if failed:
            for _, line in failed:
                logger.error(line)
            names = ", ".join(name for name, _ in failed)
            raise SystemExit(
                f"{len(failed)} case(s) of {len(data)} cannot be used (fix or remove them from the data list; "
                f"nothing was trained or evaluated): {names}"
            )

    def _load_cache_item(self, idx: int):
        if getattr(self, "_failed", None) is None:  # not filling the cache (runtime cache): as CacheDataset
            return super()._load_cache_item(idx)
        try:
            return super()._load_cache_item(idx)
        except Exception as e:  # every bad case is named, not only the first
            item = self.data[idx]
            name = str(item.get("image", item)) if isinstance(item, dict) else str(item)
            self._failed.append((name, _case_line(item, e)))
            return None

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:
            logger.error(_case_line(self.data[index], e))
            raise
