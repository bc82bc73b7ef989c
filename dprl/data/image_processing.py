"""Qwen2.5-VL image preprocessing in NumPy and PIL: resize, normalise, cut into patches.

Matches transformers' `Qwen2VLImageProcessorPil` (models/qwen2_vl/
image_processing_pil_qwen2_vl.py) for single images:

  1. convert to RGB (alpha composited over white, as transformers' `convert_to_rgb`);
  2. `smart_resize`: sides rounded to multiples of patch_size * merge_size (28), area
     scaled into [min_pixels, max_pixels], aspect ratio kept; PIL bicubic on uint8;
  3. rescale by 1/255 (in float64, then float32) and normalise with the CLIP mean/std;
  4. patchify: each image is repeated temporal_patch_size (2) times as one temporal
     patch (grid_t = 1) and flattened to rows of C*T*P*P = 1176 values, ordered by 2x2
     merge window (row-major over windows, then row-major inside a window) so that the
     vision tower's merger sees its four patches consecutively.

Hand-written rather than calling the reference: in transformers 5 importing the image
processor (or `transformers.image_transforms`) imports torch, and dprl never imports
torch. The steps above are the reference's own operations in the same dtypes, so the
outputs agree to float32 rounding (tests check max abs diff <= 1e-5).

Where it differs, it is stricter: images whose aspect ratio exceeds 200 (the reference
raises a bare ValueError), that have a side below `min_side` (older transformers and
qwen-vl-utils required sides >= 28), or whose resized area leaves [min_pixels,
max_pixels] (smart_resize's one-factor floor can push extreme shapes out) raise an
`ImageError` naming the record and image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dprl.data.records import BadRecordError

# Qwen2.5-VL's preprocessor_config.json.
QWEN2_5_VL_MIN_PIXELS = 56 * 56
QWEN2_5_VL_MAX_PIXELS = 28 * 28 * 16384  # 12,845,056
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

# Reasons (`ImageError.reason`), used as bad-record counter keys by the pipeline.
CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
IMAGE_OUT_OF_BOUNDS = "image_out_of_bounds"

ImageInput = Image.Image | bytes | np.ndarray


class ImageError(BadRecordError):
  """An image that cannot be used; `reason` is one of the constants above."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def _where(record_id: str | None, index: int) -> str:
  return f"record {record_id!r} image {index}" if record_id is not None else f"image {index}"


def smart_resize(height: int, width: int, *, factor: int = PATCH_SIZE * MERGE_SIZE,
                 min_pixels: int = QWEN2_5_VL_MIN_PIXELS,
                 max_pixels: int = QWEN2_5_VL_MAX_PIXELS) -> tuple[int, int]:
  """The reference's target size: sides multiples of `factor`, area near [min, max]."""
  if min(height, width) <= 0:
    raise ValueError(f"image has an empty side: {height}x{width}")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a "
                     f"{height}x{width} image exceeds {MAX_ASPECT_RATIO}")
  # Python's round (half to even) and the floor/ceil steps are the reference's exactly.
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, with any transparency composited over white (transformers' convert_to_rgb)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def decode_image(image: ImageInput, *, record_id: str | None = None,
                 index: int = 0) -> Image.Image:
  """Encoded bytes, a PIL image or a uint8 array [H, W(, C)] -> a decoded RGB image."""
  where = _where(record_id, index)
  if isinstance(image, (bytes, bytearray, memoryview)):
    if not image:
      raise ImageError(f"{where}: empty image bytes", MISSING_IMAGE)
    try:
      image = Image.open(io.BytesIO(image))
      image.load()  # decode now: a truncated file fails here, not deep in resize
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
      raise ImageError(f"{where}: cannot decode image bytes: {e}", CORRUPT_IMAGE) from e
  elif isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ImageError(f"{where}: arrays must be uint8 [H, W] or [H, W, C], got "
                       f"{image.dtype} {image.shape}", CORRUPT_IMAGE)
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    raise ImageError(f"{where}: expected PNG/JPEG bytes, a PIL image or a uint8 array, "
                     f"got {type(image).__name__}", CORRUPT_IMAGE)
  return to_rgb(image)


def target_size(height: int, width: int, *, min_pixels: int, max_pixels: int,
                patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                min_side: int | None = None, record_id: str | None = None,
                index: int = 0) -> tuple[int, int]:
  """`smart_resize` with the checks that make an out-of-bounds image a clear error."""
  factor = patch_size * merge_size
  min_side = factor if min_side is None else min_side
  where = _where(record_id, index)
  if min(height, width) < max(min_side, 1):
    raise ImageError(f"{where}: {height}x{width} has a side below {min_side} pixels",
                     IMAGE_OUT_OF_BOUNDS)
  try:
    resized = smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                           max_pixels=max_pixels)
  except ValueError as e:
    raise ImageError(f"{where}: {e}", IMAGE_OUT_OF_BOUNDS) from e
  if not min_pixels <= resized[0] * resized[1] <= max_pixels:
    raise ImageError(f"{where}: {height}x{width} resizes to {resized[0]}x{resized[1]}, "
                     f"outside [{min_pixels}, {max_pixels}] pixels", IMAGE_OUT_OF_BOUNDS)
  return resized


def patchify(image: np.ndarray, *, patch_size: int = PATCH_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
             merge_size: int = MERGE_SIZE) -> np.ndarray:
  """image: [H, W, C] float32 -> [H/P * W/P, C*T*P*P], rows in merge-window order."""
  height, width, channels = image.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  patches = image.reshape(grid_h // merge_size, merge_size, patch_size,
                          grid_w // merge_size, merge_size, patch_size, channels)
  # -> [gh/m, gw/m, m, m, C, P, P]: the reference's order, from channels-last input.
  patches = patches.transpose(0, 3, 1, 4, 6, 2, 5)
  # A still image is one temporal patch: the frame repeated temporal_patch_size times.
  patches = np.broadcast_to(
      patches[:, :, :, :, :, None],
      patches.shape[:5] + (temporal_patch_size,) + patches.shape[5:])
  return patches.reshape(grid_h * grid_w,
                         channels * temporal_patch_size * patch_size * patch_size)


def preprocess_images(
    images: Sequence[ImageInput],
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    min_side: int | None = None,
    record_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Images -> the vision tower's inputs, as `Qwen2VLImageProcessorPil` computes them.

  Args:
    images: encoded bytes (PNG/JPEG/...), PIL images or uint8 arrays, any mode.
    min_pixels, max_pixels: bounds on the resized area (Qwen2.5-VL: 3136, 12845056).
    min_side: reject images with a side below this many pixels; None means
      patch_size * merge_size (28). Pass 1 to accept everything the reference does.
    record_id: named in errors.

  Returns:
    pixel_values: [sum(t*h*w), 3*T*P*P] float32, images concatenated in order.
    image_grid_thw: [N, 3] int64, (1, resized_height / P, resized_width / P) per image.

  Raises:
    ImageError: undecodable or empty bytes, or a size outside the bounds (see module doc).
  """
  mean = np.asarray(image_mean, np.float32)
  std = np.asarray(image_std, np.float32)
  all_patches, grids = [], []
  for index, image in enumerate(images):
    rgb = decode_image(image, record_id=record_id, index=index)
    height, width = target_size(rgb.height, rgb.width, min_pixels=min_pixels,
                                max_pixels=max_pixels, patch_size=patch_size,
                                merge_size=merge_size, min_side=min_side,
                                record_id=record_id, index=index)
    resized = np.asarray(rgb.resize((width, height), resample=Image.Resampling.BICUBIC))
    # The reference's dtypes: rescale in float64 then cast, normalise in float32.
    pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - mean) / std
    all_patches.append(patchify(pixels, patch_size=patch_size,
                                temporal_patch_size=temporal_patch_size,
                                merge_size=merge_size))
    grids.append((1, height // patch_size, width // patch_size))
  patch_dim = 3 * temporal_patch_size * patch_size * patch_size
  if not all_patches:
    return np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64)
  return np.concatenate(all_patches, axis=0), np.asarray(grids, np.int64)


def num_image_tokens(image_grid_thw: np.ndarray, merge_size: int = MERGE_SIZE) -> np.ndarray:
  """image_grid_thw: [N, 3] -> [N] placeholder tokens per image, t*h*w // merge_size**2."""
  image_grid_thw = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  return np.prod(image_grid_thw, axis=-1) // (merge_size * merge_size)
