"""Drawing primitives for the synthetic benchmark: flat colours on black, no anti-aliasing.

Every pixel is either black or exactly one palette colour, so tests (and curious users)
can recount objects from the pixels, and a tiny vision tower sees crisp 14x14 patches.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

# Qwen2.5-VL's processor resizes to multiples of 28 (14-pixel patches merged 2x2);
# images already at a multiple reach the model unchanged.
IMAGE_MULTIPLE = 28

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
BACKGROUND = (0, 0, 0)

# A 3x5 bitmap font. PIL's own fonts change between Pillow and FreeType versions and
# anti-alias; a fixed bitmap keeps images identical everywhere and the digits legible
# at 56x56 once scaled by 2.
GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    "+": ("000", "010", "111", "010", "000"),
    "-": ("000", "000", "111", "000", "000"),
}
GLYPH_WIDTH, GLYPH_HEIGHT = 3, 5


def check_image_size(image_size: int) -> None:
  if image_size < IMAGE_MULTIPLE or image_size % IMAGE_MULTIPLE:
    raise ValueError(f"image_size must be a positive multiple of {IMAGE_MULTIPLE} so the "
                     f"Qwen2.5-VL processor does not resize it; got {image_size}")


def canvas(image_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
  image = Image.new("RGB", (image_size, image_size), BACKGROUND)
  return image, ImageDraw.Draw(image)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, x: int, y: int,
               size: int) -> None:
  """Draws `shape` filling the box with top-left (x, y) and side `size` pixels."""
  box = (x, y, x + size - 1, y + size - 1)
  fill = PALETTE[color]
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  elif shape == "triangle":
    draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)],
                 fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


def text_width(text: str, scale: int) -> int:
  return len(text) * (GLYPH_WIDTH + 1) * scale - scale


def draw_text(image: Image.Image, text: str, x: int, y: int, scale: int,
              color: str = "white") -> None:
  """Draws `text` (characters of `GLYPHS`) with one blank scaled column between glyphs."""
  pixels = np.asarray(image).copy()
  for i, char in enumerate(text):
    glyph = np.array([[c == "1" for c in row] for row in GLYPHS[char]])
    block = np.kron(glyph, np.ones((scale, scale), dtype=bool))
    left = x + i * (GLYPH_WIDTH + 1) * scale
    region = pixels[y:y + block.shape[0], left:left + block.shape[1]]
    region[block] = PALETTE[color]
  image.paste(Image.fromarray(pixels))


def encode_png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()
