"""Image utilities: decode check, metadata stripping, perceptual hash, thumbnails, base64 input.

``decode`` opens a file fully (header check, then a full pixel decode), applies the EXIF
orientation and returns a plain RGB image *rebuilt from its pixels*: no EXIF block (GPS
position, camera serial, timestamps), ICC profile, XMP or PNG text chunk survives, so an
image written from it carries pixels only. ``phash`` is the DCT perceptual hash (32x32
grey, the 8x8 lowest frequencies against their median, 64 bits): near-duplicates (resized,
recompressed, lightly edited copies) differ in a few bits.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np

from homeforge.errors import HomeforgeError

MAX_PIXELS = 64_000_000  # a decompression bomb is refused, not decoded


class BadImage(Exception):
    """An image that does not decode; ``reason`` is the drop reason, ``str(exc)`` the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise HomeforgeError("Pillow is not installed", fix="pip install 'homeforge[vision]'") from None
    return Image, ImageOps


def decode(source) -> object:
    """A clean RGB ``PIL.Image`` from a path, bytes or file object; ``BadImage`` when it does not decode."""
    Image, ImageOps = _pil()
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums (PNG CRCs)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # every pixel: catches truncated streams verify() lets through
            fmt = im.format
            im = ImageOps.exif_transpose(im)
            rgb = im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise BadImage("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise BadImage("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())  # pixels only: no info, exif, icc
    clean.format_hint = fmt  # type: ignore[attr-defined]
    return clean


def save_clean(img, path: Path, fmt: str | None = None) -> None:
    """Write ``img`` without any metadata (JPEG for JPEG sources, else PNG)."""
    fmt = fmt or ("JPEG" if getattr(img, "format_hint", None) == "JPEG" else "PNG")
    kw = {"quality": 95} if fmt == "JPEG" else {}
    img.save(path, format=fmt, **kw)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(math.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def phash(img) -> int:
    """64-bit DCT perceptual hash of a PIL image."""
    Image, _ = _pil()
    g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    d = (_DCT32 @ g @ _DCT32.T)[:8, :8].ravel()
    bits = d > np.median(d[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming_to_all(h: int, hashes: np.ndarray) -> np.ndarray:
    """Bit distances from ``h`` to every uint64 in ``hashes``."""
    x = np.bitwise_xor(hashes, np.uint64(h))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def to_array(img, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the image squashed to a square (the shards' training copy)."""
    Image, _ = _pil()
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def from_base64(data: str):
    """A decoded image from base64 (a ``data:image/...;base64,`` prefix allowed); ``BadImage`` otherwise."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise BadImage("bad_base64", f"not base64: {exc}") from None
    return decode(raw)


def thumbnail_grid(per_class: dict[str, list], path: Path, cell: int = 48, per_row: int = 8) -> None:
    """One row per class: its label, then up to ``per_row`` thumbnails."""
    Image, _ = _pil()
    from PIL import ImageDraw

    label_w = 120
    rows = list(per_class.items())
    grid = Image.new("RGB", (label_w + per_row * (cell + 2), max(1, len(rows)) * (cell + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, imgs) in enumerate(rows):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 6), str(label)[:18], fill="black")
        for c, im in enumerate(imgs[:per_row]):
            t = im.copy()
            t.thumbnail((cell, cell))
            grid.paste(t, (label_w + c * (cell + 2) + (cell - t.width) // 2, y + (cell - t.height) // 2))
    grid.save(path, format="PNG")
