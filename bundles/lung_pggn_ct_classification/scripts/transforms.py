"""Input checks used by the configs' preprocessing."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.transforms import MapTransform

__all__ = ["CheckSpatialShaped"]


class CheckSpatialShaped(MapTransform):
    """Refuse an image whose spatial shape is not ``spatial_size``, naming its file.

    The crops are made at a fixed size by ``data_prep pggn`` (``--bbox-size``, ``--crop-mm``);
    resizing another size silently would change what the network sees.

    Args:
        keys: keys of channel-first images (C, H, W, D).
        spatial_size: the expected (H, W, D).
        allow_missing_keys: skip absent keys. Default False.
    """

    def __init__(self, keys, spatial_size: Sequence[int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape[1:])
            if shape != self.spatial_size:
                meta = getattr(d[key], "meta", {}) or {}
                name = meta.get("filename_or_obj", f"'{key}'")
                raise ValueError(
                    f"crop {name} has spatial shape {shape}, the model takes {self.spatial_size} "
                    "(set `spatial_size` to match, or make the crops with the matching data_prep pggn --bbox-size/--crop-mm)"
                )
        return d
