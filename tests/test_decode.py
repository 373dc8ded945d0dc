"""The one image decoder (``transforms.decode_rgb``) of preparation, training and the served model: a pixel cap read
from the header before decoding, one frame, 8-bit RGB out. Images are written here in the formats users have."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import png16
from lade_core.data.transforms import ImageDecodeError, decode_rgb


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_8bit_rgb_png_and_jpeg_decode_to_their_pixels(rng):
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    x = decode_rgb(_encode(Image.fromarray(rgb)))
    assert x.dtype.is_floating_point is False and tuple(x.shape) == (3, 20, 30)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), rgb)
    jpeg = _encode(Image.fromarray(rgb), "JPEG", quality=95)
    np.testing.assert_array_equal(decode_rgb(jpeg).permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(jpeg))))


def _to_8bit(v: np.ndarray) -> np.ndarray:
    """The nearest 8-bit value of a 16-bit sample: round(v * 255 / 65535)."""
    return np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_16bit_images_are_scaled_to_8_bits_not_clipped(rng):
    gray = np.concatenate([np.array([0, 128, 129, 257, 65535]), rng.integers(0, 65536, 67)])
    gray = gray.reshape(8, 9).astype(np.uint16)
    x = decode_rgb(png16(gray)).numpy()
    assert x.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(x[c], _to_8bit(gray))
    rgb = rng.integers(0, 65536, (8, 9, 3)).astype(np.uint16)
    np.testing.assert_array_equal(decode_rgb(png16(rgb)).permute(1, 2, 0).numpy(), _to_8bit(rgb))
    tiff = io.BytesIO()  # Pillow's path (TIFF): the same scaling
    Image.fromarray(gray).save(tiff, format="TIFF")
    np.testing.assert_array_equal(decode_rgb(tiff.getvalue()).numpy()[1], _to_8bit(gray))


def test_grayscale_palette_and_alpha_images_become_rgb(rng):
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    for im in (Image.fromarray(rgb).convert("L"), Image.fromarray(rgb).convert("P"),
               Image.fromarray(rgb).convert("RGBA")):
        x = decode_rgb(_encode(im))
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), np.asarray(im.convert("RGB")))


def test_an_animation_gives_its_first_frame():
    frames = [Image.fromarray(np.full((10, 12, 3), c, np.uint8)) for c in (30, 200, 90)]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:],
                       **({"lossless": True} if fmt == "WEBP" else {}))
        x = decode_rgb(data)
        assert tuple(x.shape) == (3, 10, 12) and abs(int(x.float().mean()) - 30) <= 2, fmt


def test_a_decompression_bomb_is_refused_from_its_header_in_bounded_memory(tmp_path):
    """A 9 000 x 9 000 PNG of 80 kB (81 MP, 243 MB decoded) is refused before it is decoded: the process that tries
    stays far below the decoded size."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_encode(Image.new("L", (9000, 9000))))
    assert bomb.stat().st_size < 200_000
    code = ("import resource, sys; from lade_core.data.transforms import decode_rgb\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    decode_rgb(open(sys.argv[1], 'rb').read())\nexcept ValueError as e:\n    print('refused:', e)\n"
            "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120).stdout
    assert "refused: 9000 x 9000 pixels is over the 40-megapixel limit" in out, out
    assert int(out.split("grew_kb")[1]) < 50_000, out  # < 50 MB, against 243 MB (RGB) decoded
    # Every format's header is read before its pixels: each is refused at 1 001 x 1 000 against a 1 MP cap.
    big = Image.new("RGB", (1001, 1000))
    for fmt, kw in (("PNG", {}), ("JPEG", {}), ("GIF", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 50}),
                    ("BMP", {}), ("TIFF", {})):
        with pytest.raises(ImageDecodeError, match="1001 x 1000 pixels is over the 1-megapixel limit"):
            decode_rgb(_encode(big, fmt, **kw), max_pixels=1_000_000)
        assert tuple(decode_rgb(_encode(big, fmt, **kw), max_pixels=1_001_000).shape) == (3, 1000, 1001), fmt


def test_corrupt_truncated_and_float_images_are_one_clear_error(rng):
    png = _encode(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
    for data, message in ((b"not an image", "not an image lade can read"), (png[:120], "corrupt image data"),
                          (_encode(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF"), "mode F")):
        with pytest.raises(ImageDecodeError, match=message):
            decode_rgb(data)
