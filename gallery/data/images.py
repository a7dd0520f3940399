"""The one image loader: bytes from any location -> RGB uint8 array of the preset size.

Damaged items never crash a run: `load_image` raises ImageProblem with a short reason, and
`load_gallery` turns those into a list of problems to count and report.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from gallery.data.inputs import InputProblem, read_input
from gallery.data.pairs import SkippedPair

# Anything past this many pixels is treated as a decompression bomb (PIL's own default is 89M;
# product photos are far smaller, and a 20k x 20k "photo" only costs memory).
MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)


class ImageProblem(Exception):
    """A per-item problem: the image is skipped, counted and listed, the run goes on."""


@dataclass(frozen=True)
class SkippedImage:
    gallery_id: str
    image: str
    reason: str


def read_image_bytes(location) -> bytes:
    """Bytes of a local path or URI, read through the bounded input layer (gallery.data.inputs: regular
    files only, size limit, remote timeouts), or bytes already received checked against the image size
    limit; any failure to read is a per-item problem."""
    try:
        return read_input(location, "image")
    except InputProblem as e:
        raise ImageProblem(f"{e.category} ({e.reason})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency on white, 16-bit and 32-bit scaled, CMYK/YCbCr/P converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes (first frame), apply EXIF orientation, bilinear-resize to size x size."""
    if not data:
        raise ImageProblem("zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageProblem(f"decompression bomb ({img.width}x{img.height} pixels)")
            img.seek(0)  # GIF/WEBP/TIFF: the first frame
            img.load()
            return photo_array(img, size)
        except ImageProblem:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageProblem(f"decompression bomb ({e})") from None
        except Image.UnidentifiedImageError:
            raise ImageProblem("not an image (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageProblem(f"damaged image ({e})") from None


def photo_array(img: Image.Image, size: int) -> np.ndarray:
    """A decoded image as the model sees it: EXIF orientation applied, RGB, bilinear-resized to size x size.
    A grey or one-bit image is resized before it is made RGB: the same pixels, from a third of the memory
    (a 64-megapixel one-bit PNG peaks at about 120 MiB instead of 365: what the service decodes at once)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L").resize((size, size), Image.BILINEAR).convert("RGB"), dtype=np.uint8)
    return np.asarray(to_rgb(img).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_image(location, size: int) -> np.ndarray:
    """A path, URI or received bytes -> (size, size, 3) uint8; ImageProblem when it cannot be used."""
    return decode(read_image_bytes(location), size)


def load_gallery(gallery_id: str, locations: list[str], size: int,
                 max_images: int | None = None) -> tuple[np.ndarray, list[SkippedImage]]:
    """The readable images of a gallery (its first `max_images`) as (n, size, size, 3) uint8, plus the
    ones skipped: unreadable, or beyond `max_images` (listed too: a drop is never silent)."""
    images = []
    skipped = [SkippedImage(gallery_id, loc, f"beyond data.max_images ({max_images} per gallery)")
               for loc in locations[max_images:]] if max_images is not None else []
    for loc in locations[:max_images]:
        try:
            images.append(load_image(loc, size))
        except ImageProblem as e:
            skipped.append(SkippedImage(gallery_id, loc, str(e)))
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stack, skipped



@dataclass
class DataQuality:
    """What was skipped and why: counted, listed in the run's data-quality report, never silent."""

    skipped: list[SkippedImage]
    excluded: list[str]  # galleries left with no readable image
    pairs: list[SkippedPair] = field(default_factory=list)  # engagement pairs dropped at ingest

    @staticmethod
    def merge(parts) -> "DataQuality":
        parts = list(parts)
        return DataQuality([s for p in parts for s in p.skipped], [g for p in parts for g in p.excluded],
                           [s for p in parts for s in p.pairs])

    def reasons(self) -> dict[str, int]:
        """Skipped images per reason kind (the text before any parenthesis)."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            kind = s.reason.split(" (")[0]
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def summary(self) -> str:
        pairs = f"; {len(self.pairs)} engagement pair(s) dropped" if self.pairs else ""
        if not self.skipped and not self.excluded:
            return "no damaged images" + pairs
        by_reason = ", ".join(f"{n} {r}" for r, n in self.reasons().items())
        return (f"{len(self.skipped)} image(s) skipped ({by_reason}); "
                f"{len(self.excluded)} gallery(ies) excluded with no readable image" + pairs)


def load_galleries(gallery_ids, image_lists, size: int, progress=None, max_images: int | None = None):
    """Decode many galleries (the first `max_images` images of each): (kept ids, one (n, size, size, 3)
    array per kept gallery, DataQuality)."""
    kept, arrays, skipped, excluded = [], [], [], []
    for gid, locations in zip(gallery_ids, image_lists):
        stack, bad = load_gallery(gid, locations, size, max_images)
        if progress is not None:
            progress.update(len(locations[:max_images]))
        skipped += bad
        if len(stack):
            kept.append(gid)
            arrays.append(stack)
        else:
            excluded.append(gid)
    return kept, arrays, DataQuality(skipped, excluded)


def quality_csv(quality: DataQuality) -> str:
    """Every skipped image, excluded gallery and dropped engagement pair, one row each."""
    rows = [(s.gallery_id, s.image, s.reason) for s in quality.skipped]
    rows += [(g, "", "gallery excluded: no readable image") for g in quality.excluded]
    rows += [(p.gallery_a, "", f"pair with {p.gallery_b!r} dropped (task {p.task!r}, row {p.row} of its file): "
              f"{p.reason}") for p in quality.pairs]
    return pd.DataFrame(rows, columns=["gallery_id", "image", "reason"]).to_csv(index=False)
