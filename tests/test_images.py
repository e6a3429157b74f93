"""Image decoding (formats, modes, EXIF, animation, bad input) and the TF-compatible resize."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images, resize
from data_pipelines.images import ImageDecodeError


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


@pytest.fixture(scope="module")
def rgb():
  y, x = np.mgrid[0:48, 0:64]
  return np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_exact(rgb, fmt):
  kwargs = {"lossless": True} if fmt == "WEBP" else {}
  out = images.load_image(_encode(Image.fromarray(rgb), fmt, **kwargs))
  assert out.dtype == np.uint8 and out.shape == rgb.shape
  np.testing.assert_array_equal(out, rgb)


def test_jpeg_large_and_small_match_pil(rgb, tmp_path):
  """Decoding through the zero-copy path gives PIL's pixels, for a path and for bytes."""
  big = np.asarray(Image.fromarray(rgb).resize((2100, 1700)))
  data = _encode(Image.fromarray(big), "JPEG", quality=90)
  path = tmp_path / "big.jpg"
  path.write_bytes(data)
  ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  np.testing.assert_array_equal(images.load_image(data), ref)
  np.testing.assert_array_equal(images.load_image(path), ref)
  np.testing.assert_array_equal(images.load_image(str(path)), ref)


def test_modes_to_rgb(rgb):
  gray = rgb[:, :, 0]
  out = images.load_image(_encode(Image.fromarray(gray), "PNG"))
  np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, 2))

  pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  np.testing.assert_array_equal(images.load_image(_encode(pal, "PNG")),
                                np.asarray(pal.convert("RGB")))

  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
  np.testing.assert_array_equal(images.load_image(_encode(Image.fromarray(rgba), "PNG")), rgb)

  cmyk = Image.fromarray(rgb).convert("CMYK")
  out = images.load_image(_encode(cmyk, "TIFF"))
  np.testing.assert_array_equal(out, np.asarray(cmyk.convert("RGB")))
  assert images.load_image(_encode(cmyk, "JPEG")).shape == rgb.shape

  # 16-bit grayscale is rescaled, not clipped at 255 as PIL's convert("RGB") would.
  deep = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
  out = images.load_image(_encode(Image.fromarray(deep), "PNG"))
  expected = np.clip(deep.astype(np.float64) * 255 / 65535 + 0.5, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(out[:, :, 0], expected)
  assert out[:, :, 0].max() > 200 and out[:, :, 0].min() == 0

  one_bit = Image.fromarray(gray > 100)
  assert images.load_image(_encode(one_bit, "PNG")).shape == rgb.shape


def test_exif_orientation(rgb):
  img = Image.fromarray(rgb)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  out = images.load_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
  assert out.shape == (64, 48, 3)
  ref = np.asarray(Image.open(io.BytesIO(_encode(img, "JPEG", quality=95))).transpose(
      Image.Transpose.ROTATE_270))
  np.testing.assert_array_equal(out, ref)


def test_animated_gif_first_frame(rgb):
  frames = [Image.fromarray(np.full((10, 12, 3), v, np.uint8)) for v in (10, 200, 90)]
  data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
  out = images.load_image(data)
  assert out.shape == (10, 12, 3)
  np.testing.assert_array_equal(out, np.asarray(frames[0]))


def test_array_and_pil_inputs(rgb):
  np.testing.assert_array_equal(images.load_image(rgb), rgb)
  np.testing.assert_array_equal(images.load_image(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, 2))
  np.testing.assert_array_equal(images.load_image(Image.fromarray(rgb)), rgb)


def _png_header(w, h):
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
      chunk(b"IEND", b"")


def test_bad_file_corpus(rgb, tmp_path):
  """Every broken input raises ImageDecodeError naming the source and the cause."""
  jpeg = _encode(Image.fromarray(rgb), "JPEG")
  png = _encode(Image.fromarray(rgb), "PNG")
  empty_file = tmp_path / "empty.png"
  empty_file.write_bytes(b"")
  cases = {
      "truncated or corrupt": [jpeg[:len(jpeg) // 2], png[:len(png) // 2], png[:60]],
      "not an image": [np.random.default_rng(0).bytes(1000), b"GIF89a", _png_header(0, 10),
                       b"<html>404</html>"],
      "empty input": [b"", empty_file],
      "zero-size": [np.zeros((0, 5, 3), np.uint8), Image.new("RGB", (0, 0))],
      "decompression bomb": [_png_header(100_000, 100_000), _png_header(30_000, 30_000)],
      "unreadable file": [tmp_path / "missing.jpg"],
      "unsupported input type": [12345, np.zeros((4, 4, 3), np.float32)],
  }
  for cause, sources in cases.items():
    for src in sources:
      with pytest.raises(ImageDecodeError, match=cause):
        images.load_image(src)
  # The pixel limit comes from the caller's config.
  with pytest.raises(ImageDecodeError, match=r"decompression bomb.*max_pixels=1000"):
    images.load_image(png, max_pixels=1000)
  assert images.load_image(png, max_pixels=48 * 64).shape == rgb.shape
  # Named source in the message.
  with pytest.raises(ImageDecodeError, match="missing.jpg"):
    images.load_image(tmp_path / "missing.jpg")


def test_image_size_from_the_header(rgb, tmp_path):
  """image_size: the shape load_image returns (EXIF applied), the same errors, no pixel decode."""
  exif = Image.Exif()
  exif[0x0112] = 6
  rotated = tmp_path / "rotated.jpg"
  rotated.write_bytes(_encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes()))
  assert images.image_size(rotated) == images.load_image(rotated).shape[:2] == (64, 48)
  # Broken pixel data behind a good header: only load_image finds it.
  noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)  # pixel data >> header
  jpeg = _encode(Image.fromarray(noise), "JPEG")
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(jpeg[:len(jpeg) // 2])
  assert images.image_size(truncated) == (120, 160)
  with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
    images.load_image(truncated)
  for name, data, cause in (("bomb.png", _png_header(100_000, 100_000), "decompression bomb"),
                            ("html.png", b"<html>404</html>", "not an image"),
                            ("zero.png", _png_header(0, 10), "not an image")):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageDecodeError, match=cause):
      images.image_size(tmp_path / name)
  for path in (tmp_path / "missing.jpg", tmp_path, "nul\0byte.jpg"):
    with pytest.raises(ImageDecodeError, match="unreadable file"):
      images.image_size(path)


def test_scaled_size_float32_truncation():
  assert images.scaled_size(1080, 1920, 784, 1008) == (567, 1007)
  assert images.scaled_size(1500, 60, 336, 336) == (336, 13)
  assert images.scaled_size(1, 6000, 336, 336) == (1, 336)  # never below one pixel


def test_resize_weights_rows_sum_to_one():
  for n_in, n_out in [(1, 7), (7, 1), (100, 13), (13, 100), (2000, 336), (336, 336)]:
    w = resize.resize_weights(n_in, n_out).toarray()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    assert np.all(w >= 0)


def test_resize_same_size_is_conversion(rgb):
  out = resize.resize(rgb, rgb.shape[:2])
  np.testing.assert_array_equal(out, rgb.astype(np.float32) * np.float32(1 / 255))


def test_resize_and_pad(rgb):
  canvas, box = images.resize_and_pad(rgb, (100, 100))
  top, left, h, w = box
  assert (h, w) == (75, 100) and (top, left) == (12, 0)
  pad = (np.float32(0) - np.asarray(images.CLIP_MEAN, np.float32)) / np.asarray(
      images.CLIP_STD, np.float32)
  np.testing.assert_array_equal(canvas[0, 0], pad)
  np.testing.assert_array_equal(canvas[top + h, 0], pad)
  assert canvas.dtype == np.float32 and canvas.shape == (100, 100, 3)


def test_resize_float_input_and_chunking_agree(rgb):
  """The chunked uint8 path (conversion fused with the row pass) equals resizing the converted
  float image, for several sizes at once and for tall images spanning many chunks."""
  tall = np.tile(rgb, (5, 1, 1))  # 240 rows: several conversion chunks
  sizes = [(100, 30), (37, 64), (240, 64), (500, 9)]
  from_uint8 = resize.resize_many(tall, sizes)
  from_float = resize.resize_many(resize.to_float(tall), sizes)
  for a, b, (h, w) in zip(from_uint8, from_float, sizes):
    assert a.shape == (h, w, 3)
    np.testing.assert_array_equal(a, b)
