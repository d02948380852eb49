"""Instance masks from the forms datasets store them in: COCO polygons, COCO RLE (compressed or
not) and one binary PNG per instance. Decoding goes through pycocotools; before that the
input is checked in plain Python, because pycocotools' C code accepts malformed counts
silently (or crashes) instead of saying what is wrong.

:func:`mask_facts` turns one stored mask into a row of facts for the validation tables;
:func:`decode` gives the boolean HxW mask for training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

BOX_TOLERANCE_PX = 4.0  # default pixels a stored box may differ from the decoded mask's extent...
BOX_TOLERANCE_FRACTION = 0.1  # ...or this fraction of the box's longer side, whichever is larger


class MaskError(ValueError):
    """A stored mask that cannot be turned into an HxW boolean array (message says why)."""


def segmentation_kind(segmentation) -> str:
    if isinstance(segmentation, list):
        return "polygon"
    if isinstance(segmentation, dict):
        return "rle"
    return "unknown"


def rle_string_to_counts(counts: str) -> list[int]:
    """COCO's compressed RLE string back to run lengths (the inverse of maskApi.c rleToString).

    Each run is a little-endian sequence of 5-bit groups stored as chr(48 + group), bit 0x20 meaning
    "more groups follow" and 0x10 the sign of the last group; from the third run on, a run is stored
    as the difference to the run two places before.
    """
    out: list[int] = []
    i, n = 0, len(counts)
    while i < n:
        x, k, more = 0, 0, True
        while more:
            if i >= n:
                raise MaskError("compressed RLE counts end in the middle of a run")
            c = ord(counts[i]) - 48
            if not 0 <= c < 64:
                raise MaskError(f"compressed RLE counts hold an invalid character {counts[i]!r} at position {i}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _check_rle(segmentation: dict, height: int, width: int) -> tuple[list[int], tuple[int, int]]:
    """Run lengths and stored size of an RLE; raises MaskError when it cannot be decoded."""
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise MaskError(f"RLE 'size' must be [height, width], got {size!r}")
    if isinstance(counts, str):
        runs = rle_string_to_counts(counts)
    elif isinstance(counts, list) and all(isinstance(v, int) for v in counts):
        runs = list(counts)
    else:
        raise MaskError("RLE 'counts' must be a compressed string or a list of integers")
    if any(v < 0 for v in runs):
        raise MaskError("RLE counts hold a negative run length")
    return runs, (int(size[0]), int(size[1]))


def _check_polygons(segmentation: list) -> int:
    """Fewest points of the outlines; raises MaskError for non-numeric or odd-length coordinate lists."""
    if not segmentation:
        raise MaskError("polygon list is empty")
    fewest = None
    for poly in segmentation:
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in poly):
            raise MaskError("a polygon must be a flat list of numbers x0,y0,x1,y1,...")
        if len(poly) % 2:
            raise MaskError(f"a polygon has an odd number of coordinates ({len(poly)})")
        fewest = len(poly) // 2 if fewest is None else min(fewest, len(poly) // 2)
    return fewest


def decode(segmentation, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of a COCO polygon list or RLE (checked first; MaskError says what is wrong)."""
    from pycocotools import mask as mask_utils

    kind = segmentation_kind(segmentation)
    if kind == "polygon":
        if _check_polygons(segmentation) < 3:
            raise MaskError("a polygon has fewer than 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif kind == "rle":
        runs, (h, w) = _check_rle(segmentation, height, width)
        if sum(runs) != h * w:
            raise MaskError(f"RLE counts add up to {sum(runs)}, not height*width = {h}*{w} = {h * w}")
        rle = {"size": [h, w], "counts": segmentation["counts"]}
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, h, w)
        else:
            rle = {"size": [h, w], "counts": rle["counts"].encode("ascii")}
    else:
        raise MaskError(f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def read_png_mask(path: str | Path) -> np.ndarray:
    """A per-instance PNG as a boolean mask: any non-zero pixel is the instance (validation checks it is binary)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16") else im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        from cv_models.base import DataError

        raise DataError(f"{path}: instance mask cannot be read ({type(err).__name__}: {err}) (rule: every mask decodes; "
                        f"run the validate stage)") from None
    return arr > 0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Extent of a boolean mask as xywh in pixel edges (COCO convention), None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())


EMPTY_FACTS = {
    "kind": "", "decodes": False, "error": "", "polygon_points": np.nan, "polygon_ok": True, "rle_sum": np.nan,
    "rle_sum_ok": True, "png_binary": True, "mask_height": 0, "mask_width": 0, "size_matches": True, "area": 0,
    "non_empty": True, "box_error": 0.0, "box_matches": True, "mask_x0": np.nan, "mask_y0": np.nan, "mask_x1": np.nan,
    "mask_y1": np.nan,
}


def mask_facts(height: int, width: int, segmentation=None, png_path: Path | None = None,
               bbox: list[float] | None = None, tolerance_px: float = BOX_TOLERANCE_PX,
               tolerance_fraction: float = BOX_TOLERANCE_FRACTION) -> dict:
    """One validation row: how the mask is stored and whether each rule holds.

    Columns of rules that do not apply (the RLE rule for a polygon, the size rule for a mask
    that does not decode at all) are True, so each broken mask is reported under its own rule.
    """
    row = dict(EMPTY_FACTS)
    mask = None
    try:
        if png_path is not None:
            row["kind"] = "png"
            with Image.open(png_path) as im:
                im.load()
                arr = np.asarray(im)
            if arr.ndim == 3:  # RGB(A) instance PNGs are accepted when every channel is the same
                same = (arr[..., :3] == arr[..., :1]).all()
                arr = arr[..., 0] if same else arr.sum(-1)
            row["png_binary"] = bool(len(np.unique(arr)) <= 2 and (arr.min() == 0 or arr.max() == arr.min()))
            mask = arr > 0
        else:
            row["kind"] = segmentation_kind(segmentation)
            if row["kind"] == "polygon":
                try:
                    row["polygon_points"] = _check_polygons(segmentation)
                except MaskError:
                    row["polygon_ok"] = False
                    raise
                row["polygon_ok"] = row["polygon_points"] >= 3
                if not row["polygon_ok"]:
                    raise MaskError("a polygon has fewer than 3 points")
                mask = decode(segmentation, height, width)
            elif row["kind"] == "rle":
                runs, (h, w) = _check_rle(segmentation, height, width)
                row["rle_sum"] = sum(runs)
                row["rle_sum_ok"] = sum(runs) == h * w
                if not row["rle_sum_ok"]:
                    raise MaskError(f"RLE counts add up to {sum(runs)}, not {h}*{w}")
                mask = decode(segmentation, h, w)
            else:
                mask = decode(segmentation, height, width)  # raises with the reason
    except (MaskError, OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as err:
        row["error"] = f"{type(err).__name__}: {err}"
        return row
    row["decodes"] = True
    row["mask_height"], row["mask_width"] = int(mask.shape[0]), int(mask.shape[1])
    row["size_matches"] = mask.shape == (height, width)
    row["area"] = int(mask.sum())
    row["non_empty"] = row["area"] > 0
    extent = mask_box(mask)
    if extent is not None:
        row.update(mask_x0=extent[0], mask_y0=extent[1], mask_x1=extent[0] + extent[2], mask_y1=extent[1] + extent[3])
    if bbox is not None and extent is not None:
        row["box_error"] = float(max(abs(a - b) for a, b in zip(bbox, extent)))
        row["box_matches"] = row["box_error"] <= max(tolerance_px, tolerance_fraction * max(extent[2], extent[3]))
    return row
