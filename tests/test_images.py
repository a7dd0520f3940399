"""The one image loader: every common format and mode to RGB, damaged files as per-item problems."""
import io

import numpy as np
import pytest
from PIL import Image

from gallery.data.images import MAX_PIXELS, ImageProblem, load_galleries, load_image

RED = (200, 30, 30)


def save(path, img, fmt, **kw):
    img.save(path, fmt, **kw)
    return str(path)


@pytest.mark.parametrize("fmt,mode", [
    ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "LA"),
    ("PNG", "P"), ("WEBP", "RGB"), ("WEBP", "RGBA"), ("GIF", "P"), ("TIFF", "CMYK"),
])
def test_formats_and_modes_become_rgb(tmp_path, fmt, mode):
    img = Image.new("RGB", (40, 30), RED).convert(mode)
    out = load_image(save(tmp_path / f"x.{fmt.lower()}", img, fmt), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    expected = np.asarray(img.convert("RGB")).reshape(-1, 3).mean(0)
    assert np.abs(out.reshape(-1, 3).mean(0) - expected).max() < 12


def test_transparency_composited_on_white(tmp_path):
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    out = load_image(save(tmp_path / "t.png", img, "PNG"), 8)
    assert (out == 255).all()
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0] * 256)
    out = load_image(save(tmp_path / "p.png", pal, "PNG", transparency=0), 8)
    assert (out == 255).all()


def test_16_bit_scaled_not_clipped(tmp_path):
    a = np.full((10, 10), 32768, np.uint16)
    out = load_image(save(tmp_path / "g16.png", Image.fromarray(a), "PNG"), 4)
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in (RED, (0, 0, 255))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = load_image(str(path), 4)
    assert out[..., 0].mean() > 150 and out[..., 2].mean() < 80


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    out = load_image(save(tmp_path / "o.jpg", img, "JPEG", exif=exif, quality=95), 20)
    top, bottom = out[:8].reshape(-1, 3).mean(0), out[-8:].reshape(-1, 3).mean(0)
    assert top[0] > 150 and bottom[2] > 150  # the red half ends on top after the turn


def test_bilinear_resize_of_non_square(tmp_path):
    out = load_image(save(tmp_path / "w.png", Image.new("RGB", (300, 100), RED), "PNG"), 32)
    assert out.shape == (32, 32, 3)



@pytest.mark.parametrize("mode", ["1", "L"])
def test_grey_images_resized_before_rgb_give_the_rgb_resize_exactly(tmp_path, mode):
    """Grey and one-bit photos are resized as one channel (a third of the memory of a huge one): the
    pixels are those of resizing the RGB image, what every other mode gets."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray((rng.random((173, 251)) * 255).astype(np.uint8), "L").convert(mode)
    expected = np.asarray(grey.convert("RGB").resize((32, 32), Image.BILINEAR))
    out = load_image(save(tmp_path / "g.png", grey, "PNG"), 32)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert np.array_equal(out[..., 0], out[..., 2]) and out.std() > 3  # grey, and not flat

@pytest.fixture
def damaged(tmp_path):
    good = Image.new("RGB", (64, 64), RED)
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    side = int(MAX_PIXELS ** 0.5) + 1000  # a small 1-bit PNG that decodes past the pixel limit
    Image.new("1", (side, side), 0).save(tmp_path / "bomb.png", optimize=True)
    return tmp_path


@pytest.mark.parametrize("name,reason", [
    ("missing.jpg", "missing file"), ("zero.jpg", "zero-byte file"), ("truncated.jpg", "damaged image"),
    ("text.jpg", "not an image"), ("bomb.png", "decompression bomb"),
])
def test_damaged_files_are_problems(damaged, name, reason):
    with pytest.raises(ImageProblem, match=reason):
        load_image(str(damaged / name), 16)


def test_damaged_items_skipped_counted_and_empty_gallery_excluded(damaged):
    good = save(damaged / "good.png", Image.new("RGB", (10, 10), RED), "PNG")
    kept, arrays, quality = load_galleries(
        ["ok", "broken"],
        [[good, str(damaged / "zero.jpg"), good], [str(damaged / "missing.jpg"), str(damaged / "bomb.png")]],
        8)
    assert kept == ["ok"] and arrays[0].shape == (2, 8, 8, 3)
    assert quality.excluded == ["broken"]
    assert [(s.gallery_id, s.reason.split(" (")[0]) for s in quality.skipped] == [
        ("ok", "zero-byte file"), ("broken", "missing file"), ("broken", "decompression bomb")]
    assert quality.summary().startswith("3 image(s) skipped") and "1 gallery(ies) excluded" in quality.summary()
