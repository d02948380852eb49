"""Reading facts about image files for the validation tables."""
from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cv_models.base import DataError

# PIL refuses images above Image.MAX_IMAGE_PIXELS (decompression bombs: a small file declaring a huge canvas)
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_header_lock = threading.Lock()


def _declared_size(path: Path) -> tuple[int, int]:
    """The width and height a bomb's header declares, read without decoding a pixel (so the size rules name it)."""
    with _header_lock:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as im:
                return im.size
        except Exception:  # noqa: BLE001 - unreadable header: sizes stay unknown
            return 0, 0
        finally:
            Image.MAX_IMAGE_PIXELS = limit

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def probe_image(path: Path) -> dict:
    """Width, height, channels, mode, size, content hash and whether the file fully decodes."""
    data = path.read_bytes()
    row = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": 0,
        "height": 0,
        "channels": 0,
        "mode": "",
        "decodes": False,
        "error": "",
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit at all: refuse
            with Image.open(path) as im:
                row.update(width=im.width, height=im.height, mode=im.mode, channels=len(im.getbands()))
                im.load()  # a truncated file opens but fails here
        row["decodes"] = True
    except BOMB_ERRORS as err:
        width, height = _declared_size(path)
        row.update(width=width, height=height)  # the max_size rule names it too
        row["error"] = (f"{type(err).__name__}: {err} (rule: at most {Image.MAX_IMAGE_PIXELS} pixels, PIL's decompression "
                        f"bomb limit)")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        row["error"] = f"{type(err).__name__}: {err}"
    return row


def screen_image(path: Path, min_size: int, max_size: int) -> tuple[str | None, str | None]:
    """validate's rules on one image, read from its header only (no pixel is decoded): returns why the file
    must be skipped (or None) and a note (or None). Unreadable headers, decompression bombs and sides above
    ``max_size`` are skipped; sides below ``min_size`` are noted (validate refuses them in a dataset)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except BOMB_ERRORS as err:
        width, height = _declared_size(path)
        return (f"{width}x{height} declared, {type(err).__name__} (rule: at most {Image.MAX_IMAGE_PIXELS} pixels, "
                f"PIL's decompression bomb limit)"), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"not readable as an image ({type(err).__name__}: {err})", None
    if max(width, height) > max_size:
        return f"{width}x{height} (rule: width and height at most data.max_size {max_size})", None
    if min(width, height) < min_size:
        return None, (f"{width}x{height} is below data.min_size {min_size} (validate refuses such images in a dataset); "
                      f"predicted, but the result means little")
    return None, None


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB (grayscale, palette and RGBA are converted; validation reports them).
    A file that does not decode stops with its name and the rule, not a raw PIL traceback."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")
    except (*BOMB_ERRORS, UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}) (rule: every file decodes as "
                        f"an image within PIL's pixel limit; run the validate stage)") from None
