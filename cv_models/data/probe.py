"""Reading facts about image files for the validation tables."""
from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

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
        with Image.open(path) as im:
            row.update(width=im.width, height=im.height, mode=im.mode, channels=len(im.getbands()))
            im.load()  # a truncated file opens but fails here
        row["decodes"] = True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        row["error"] = f"{type(err).__name__}: {err}"
    return row


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB (grayscale, palette and RGBA are converted; validation reports them)."""
    with Image.open(path) as im:
        return im.convert("RGB")
