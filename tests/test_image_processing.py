"""Image preprocessing: parity with transformers' Qwen2VLImageProcessorPil, and errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dprl.data import image_processing as ip
from dprl.data.records import BadRecordError

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 256


@pytest.fixture(scope="module")
def reference():
  pil_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

  def run(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    processor = pil_module.Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2,
        merge_size=2, image_mean=list(ip.OPENAI_CLIP_MEAN), image_std=list(ip.OPENAI_CLIP_STD),
        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        do_convert_rgb=True)
    out = processor(images=images)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])

  return run


def _random_image(height, width, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
  shape = (height, width) if channels is None else (height, width, channels)
  # Smooth gradients plus noise, so bicubic resampling has real work to do.
  base = np.linspace(0, 255, width)[None, :] * np.linspace(0.2, 1.0, height)[:, None]
  if channels is not None:
    base = base[..., None]
  array = np.clip(base + rng.integers(-40, 40, shape), 0, 255).astype(np.uint8)
  return Image.fromarray(array, mode=mode)


def _encode(image, fmt="PNG"):
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


@pytest.mark.parametrize("height,width", [
    (224, 224),  # already multiples of 28
    (300, 400),  # rounded to 308x392
    (37, 500),  # wide
    (700, 90),  # tall
    (640, 480),  # above max_pixels: scaled down
    (30, 45),  # below min_pixels: scaled up
])
def test_matches_reference_on_sizes_and_aspect_ratios(reference, height, width):
  image = _random_image(height, width, seed=height * width)
  pixel_values, grid = ip.preprocess_images([image], min_pixels=MIN_PIXELS,
                                            max_pixels=MAX_PIXELS)
  ref_values, ref_grid = reference([image])
  assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
  assert pixel_values.shape == ref_values.shape
  np.testing.assert_array_equal(grid, ref_grid)
  assert np.abs(pixel_values - ref_values).max() <= 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA"])
def test_non_rgb_modes_convert_like_reference(reference, mode):
  image = _random_image(90, 120, mode=mode, seed=7)
  pixel_values, grid = ip.preprocess_images([_encode(image)], min_pixels=MIN_PIXELS,
                                            max_pixels=MAX_PIXELS)
  ref_values, ref_grid = reference([image])
  np.testing.assert_array_equal(grid, ref_grid)
  assert np.abs(pixel_values - ref_values).max() <= 1e-5


def test_palette_image_with_transparency_composites_over_white(reference):
  image = _random_image(60, 60, seed=3).convert("P")
  image.info["transparency"] = 0
  pixel_values, _ = ip.preprocess_images([image], min_pixels=MIN_PIXELS,
                                         max_pixels=MAX_PIXELS)
  ref_values, _ = reference([image])
  assert np.abs(pixel_values - ref_values).max() <= 1e-5


def test_several_images_concatenate_in_order_like_reference(reference):
  images = [_random_image(100, 150, seed=1), _random_image(56, 56, seed=2),
            _random_image(200, 60, seed=3)]
  jpeg_bytes = [_encode(image, "JPEG") for image in images]
  decoded = [Image.open(io.BytesIO(b)) for b in jpeg_bytes]
  pixel_values, grid = ip.preprocess_images(jpeg_bytes, min_pixels=MIN_PIXELS,
                                            max_pixels=MAX_PIXELS)
  ref_values, ref_grid = reference(decoded)
  np.testing.assert_array_equal(grid, ref_grid)
  assert np.abs(pixel_values - ref_values).max() <= 1e-5
  assert pixel_values.shape == (int(np.prod(grid, axis=1).sum()), 3 * 2 * 14 * 14)
  np.testing.assert_array_equal(ip.num_image_tokens(grid), np.prod(grid, axis=1) // 4)


def test_uint8_arrays_are_accepted(reference):
  image = _random_image(84, 112, seed=5)
  pixel_values, _ = ip.preprocess_images([np.asarray(image)], min_pixels=MIN_PIXELS,
                                         max_pixels=MAX_PIXELS)
  assert np.abs(pixel_values - reference([image])[0]).max() <= 1e-5


def test_min_side_one_accepts_tiny_images_like_reference(reference):
  image = _random_image(10, 15, seed=9)
  with pytest.raises(ip.ImageError, match="side below 28"):
    ip.preprocess_images([image], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  pixel_values, grid = ip.preprocess_images([image], min_pixels=MIN_PIXELS,
                                            max_pixels=MAX_PIXELS, min_side=1)
  ref_values, ref_grid = reference([image])
  np.testing.assert_array_equal(grid, ref_grid)
  assert np.abs(pixel_values - ref_values).max() <= 1e-5


def test_patch_rows_follow_merge_windows():
  # A 56x56 image is a 4x4 grid of patches, one 2x2 merge window per 28x28 quadrant;
  # the rows of one window must be consecutive: quadrant order TL, TR, BL, BR.
  pixels = np.zeros((56, 56, 3), np.float32)
  for qi, (r, c) in enumerate([(0, 0), (0, 28), (28, 0), (28, 28)]):
    pixels[r:r + 28, c:c + 28] = qi
  rows = ip.patchify(pixels)
  assert rows.shape == (16, 1176)
  np.testing.assert_array_equal(rows.mean(axis=1), np.repeat(np.arange(4.0), 4))


def test_empty_image_list_gives_empty_arrays():
  pixel_values, grid = ip.preprocess_images([], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  assert pixel_values.shape == (0, 1176) and grid.shape == (0, 3)


def test_corrupt_bytes_name_the_record():
  truncated = _encode(_random_image(64, 64))[:50]
  with pytest.raises(ip.ImageError, match=r"record 'geo-17' image 1: cannot decode") as info:
    ip.preprocess_images([_encode(_random_image(64, 64)), truncated], min_pixels=MIN_PIXELS,
                         max_pixels=MAX_PIXELS, record_id="geo-17")
  assert info.value.reason == ip.CORRUPT_IMAGE
  assert isinstance(info.value, BadRecordError)
  with pytest.raises(ip.ImageError, match="image 0: cannot decode"):
    ip.preprocess_images([b"not an image"], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def test_empty_bytes_are_a_missing_image():
  with pytest.raises(ip.ImageError, match="record 'a' image 0: empty") as info:
    ip.preprocess_images([b""], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, record_id="a")
  assert info.value.reason == ip.MISSING_IMAGE


def test_aspect_ratio_above_200_is_out_of_bounds():
  with pytest.raises(ip.ImageError, match="record 'x' image 0: aspect ratio") as info:
    ip.preprocess_images([_random_image(28, 28 * 201)], min_pixels=MIN_PIXELS,
                         max_pixels=28 * 28 * 1000, record_id="x")
  assert info.value.reason == ip.IMAGE_OUT_OF_BOUNDS


def test_resize_that_cannot_fit_the_pixel_bounds_is_out_of_bounds():
  # 28x5000 cannot shrink below 28 rows, so it stays above 7840 pixels.
  with pytest.raises(ip.ImageError, match="outside \\[3136, 7840\\] pixels"):
    ip.preprocess_images([_random_image(28, 5000)], min_pixels=MIN_PIXELS,
                         max_pixels=28 * 28 * 10)


def test_smart_resize_keeps_bounds_and_multiples():
  for height, width in [(28, 28), (1000, 1000), (123, 4567), (5000, 3000), (31, 29)]:
    h, w = ip.smart_resize(height, width, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert h % 28 == 0 and w % 28 == 0
    assert MIN_PIXELS <= h * w <= MAX_PIXELS


def test_image_processing_module_does_not_need_torch():
  import subprocess
  import sys
  code = ("import sys\nimport dprl.data.image_processing\n"
          "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
