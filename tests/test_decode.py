"""The one image decoder (``transforms.decode_rgb``) of preparation, training and the served model: a pixel cap read
from the header before decoding, one frame, 8-bit RGB out. Images are written here in the formats users have."""
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from lade_core.data.transforms import ImageDecodeError, decode_rgb


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3]) written from the PNG specification, big-endian samples."""
    h, w = samples.shape[:2]
    colour = 0 if samples.ndim == 2 else 2
    rows = samples.astype(">u2").reshape(h, -1).tobytes()
    raw = b"".join(b"\x00" + rows[i * len(rows) // h:(i + 1) * len(rows) // h] for i in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_8bit_rgb_png_and_jpeg_decode_to_their_pixels(rng):
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    x = decode_rgb(_encode(Image.fromarray(rgb)))
    assert x.dtype.is_floating_point is False and tuple(x.shape) == (3, 20, 30)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), rgb)
    jpeg = _encode(Image.fromarray(rgb), "JPEG", quality=95)
    np.testing.assert_array_equal(decode_rgb(jpeg).permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(jpeg))))


def test_16bit_pngs_are_scaled_to_8_bits_not_clipped(rng):
    gray = rng.integers(0, 65536, (8, 9)).astype(np.uint16)
    x = decode_rgb(_png16(gray)).numpy()
    assert x.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(x[c], gray >> 8)
    rgb = rng.integers(0, 65536, (8, 9, 3)).astype(np.uint16)
    np.testing.assert_array_equal(decode_rgb(_png16(rgb)).permute(1, 2, 0).numpy(), rgb >> 8)


def test_grayscale_palette_and_alpha_images_become_rgb(rng):
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    for im in (Image.fromarray(rgb).convert("L"), Image.fromarray(rgb).convert("P"), Image.fromarray(rgb).convert("RGBA")):
        x = decode_rgb(_encode(im))
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), np.asarray(im.convert("RGB")))


def test_an_animation_gives_its_first_frame():
    frames = [Image.fromarray(np.full((10, 12, 3), c, np.uint8)) for c in (30, 200, 90)]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
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
    with pytest.raises(ImageDecodeError, match="over the 1-megapixel limit"):
        decode_rgb(_encode(Image.new("RGB", (1001, 1000))), max_pixels=1_000_000)


def test_corrupt_truncated_and_float_images_are_one_clear_error(rng):
    png = _encode(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
    for data, message in ((b"not an image", "not an image Pillow can read"), (png[:120], "corrupt image data"),
                          (_encode(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF"), "mode F")):
        with pytest.raises(ImageDecodeError, match=message):
            decode_rgb(data)
