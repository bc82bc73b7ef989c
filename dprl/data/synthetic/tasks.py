"""Task families of the synthetic benchmark, registered by name in `TASKS`.

A task samples a *scene* (a JSON-native dict holding everything drawn plus what the
question asks about), and derives from it, as pure functions, the image, the question,
the exact answer and a caption. Storing the scene in `Record.metadata["scene"]` lets
anyone recompute the answer without trusting the generator's bookkeeping.

All texts use the small fixed vocabulary `WORDS` (lower case, digits one token each,
punctuation `. , ? + -`) so a tiny word- or character-level tokenizer covers them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dprl.data.synthetic import render

Scene = dict[str, Any]

COUNT_COLORS = ("red", "green", "blue")
COUNT_SHAPES = ("circle", "square")  # the colour-counting demo's shapes
ALL_SHAPES = ("circle", "square", "triangle")
BAR_COLORS = ("red", "green", "blue", "yellow", "white")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}

TOKEN_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")

# Every token any task may write, checked against generated text by the tests.
WORDS = frozenset(
    "how many shapes are what is the value image shows much taller than which bar "
    "bars from left tallest sides has a color sky grass blood lemon snow "
    "red green blue yellow white circle circles square squares triangle triangles "
    "0 1 2 3 4 5 6 7 8 9 . , ? + -".split())


def tokenize_words(text: str) -> list[str]:
  """Splits text into `WORDS` tokens: words, single digits, single punctuation marks."""
  return TOKEN_PATTERN.findall(text)


class Task:
  """One task family. Subclasses set `name` and `answer_kind` and fill in the methods."""

  name: ClassVar[str]
  answer_kind: ClassVar[str]  # "number" or "color": which language-prior questions fit

  def levels(self, image_size: int) -> list[int]:
    raise NotImplementedError

  def sample(self, rng: np.random.Generator, level: int, image_size: int) -> Scene:
    raise NotImplementedError

  def render(self, scene: Scene, image_size: int) -> Image.Image:
    raise NotImplementedError

  def question(self, scene: Scene) -> str:
    raise NotImplementedError

  def answer(self, scene: Scene) -> str:
    raise NotImplementedError

  def caption(self, scene: Scene) -> str:
    raise NotImplementedError


TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
  if cls.name in TASKS:
    raise ValueError(f"task {cls.name!r} registered twice")
  TASKS[cls.name] = cls()
  return cls


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown synthetic task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name]


# ------------------------------------------------------------------ counting


def _grid(image_size: int) -> tuple[int, int, int]:
  """(cells per side, cell pixels, offset): one object per cell, so none overlap."""
  cells = max(1, image_size // 18)  # 56 px -> a 3x3 grid of 18 px cells, as in the demo
  cell = image_size // cells
  return cells, cell, (image_size - cells * cell) // 2


def _place_objects(rng: np.random.Generator, kinds: list[tuple[str, str]],
                   image_size: int) -> list[dict[str, Any]]:
  cells, cell, offset = _grid(image_size)
  chosen = rng.choice(cells * cells, size=len(kinds), replace=False)
  # A 2 px margin inside each cell keeps neighbours >= 4 px apart: separate blobs.
  low, high = max(3, round(cell * 0.55)), cell - 4
  objects = []
  for (shape, color), index in zip(kinds, chosen):
    size = int(rng.integers(low, high + 1))
    row, col = divmod(int(index), cells)
    slack = cell - 4 - size
    x = offset + col * cell + 2 + int(rng.integers(0, slack + 1))
    y = offset + row * cell + 2 + int(rng.integers(0, slack + 1))
    objects.append({"shape": shape, "color": color, "x": x, "y": y, "size": size})
  return objects


def _render_objects(scene: Scene, image_size: int) -> Image.Image:
  image, draw = render.canvas(image_size)
  for o in scene["objects"]:
    render.draw_shape(draw, o["shape"], o["color"], o["x"], o["y"], o["size"])
  return image


def _count_caption(objects: list[dict[str, Any]]) -> str:
  # Canonical order (palette, then shape), so equal scenes get equal captions.
  groups = []
  for color in render.PALETTE:
    for shape in ALL_SHAPES:
      n = sum(o["color"] == color and o["shape"] == shape for o in objects)
      if n:
        groups.append(f"{n} {color} {shape if n == 1 else PLURAL[shape]}")
  return ", ".join(groups) + "."


class _CountTask(Task):
  answer_kind = "number"

  def levels(self, image_size: int) -> list[int]:
    cells, _, _ = _grid(image_size)
    return list(range(1, cells * cells + 1))  # level = number of objects

  def render(self, scene: Scene, image_size: int) -> Image.Image:
    return _render_objects(scene, image_size)

  def caption(self, scene: Scene) -> str:
    return _count_caption(scene["objects"])


@register_task
class CountColor(_CountTask):
  """"how many red shapes?": 1 to 9 circles and squares in red, green, blue on black.

  The number asked about is uniform in [1, level], which makes "1" the most common
  answer (about a third), as in the prototype that learned on 2 CPU cores.
  """

  name = "count_color"

  def sample(self, rng, level, image_size):
    target = str(rng.choice(COUNT_COLORS))
    others = [c for c in COUNT_COLORS if c != target]
    k = int(rng.integers(1, level + 1))
    colors = [target] * k + [str(rng.choice(others)) for _ in range(level - k)]
    kinds = [(str(rng.choice(COUNT_SHAPES)), c) for c in colors]
    return {"objects": _place_objects(rng, kinds, image_size), "query": target}

  def question(self, scene):
    return f"how many {scene['query']} shapes?"

  def answer(self, scene):
    return str(sum(o["color"] == scene["query"] for o in scene["objects"]))


@register_task
class CountRed(CountColor):
  """"how many red shapes?" always: the prototype's task (shared/docs/tiny-rl-facts.md).

  With the colour fixed, the image alone decides the answer, so a ~1M-parameter model
  learns it in minutes on 2 CPU cores; `count_color` also has to bind the question's
  colour to the image, which the CPU demo's warm start does not reach in its budget.
  """

  name = "count_red"

  def sample(self, rng, level, image_size):
    others = [c for c in COUNT_COLORS if c != "red"]
    k = int(rng.integers(1, level + 1))
    colors = ["red"] * k + [str(rng.choice(others)) for _ in range(level - k)]
    kinds = [(str(rng.choice(COUNT_SHAPES)), c) for c in colors]
    return {"objects": _place_objects(rng, kinds, image_size), "query": "red"}


@register_task
class CountShape(_CountTask):
  """"how many circles?": circles, squares and triangles in red, green, blue."""

  name = "count_shape"

  def sample(self, rng, level, image_size):
    target = str(rng.choice(ALL_SHAPES))
    others = [s for s in ALL_SHAPES if s != target]
    k = int(rng.integers(1, level + 1))
    shapes = [target] * k + [str(rng.choice(others)) for _ in range(level - k)]
    kinds = [(s, str(rng.choice(COUNT_COLORS))) for s in shapes]
    return {"objects": _place_objects(rng, kinds, image_size), "query": target}

  def question(self, scene):
    return f"how many {PLURAL[scene['query']]}?"

  def answer(self, scene):
    return str(sum(o["shape"] == scene["query"] for o in scene["objects"]))


# ------------------------------------------------------------------ arithmetic


def evaluate(expression: str) -> int:
  """Value of a `+`/`-` expression of single digits, left to right (= usual precedence)."""
  tokens = re.findall(r"[0-9]|[+-]", expression)
  value = int(tokens[0])
  for op, digit in zip(tokens[1::2], tokens[2::2]):
    value = value + int(digit) if op == "+" else value - int(digit)
  return value


@register_task
class Arithmetic(Task):
  """An expression of single digits joined by + and - drawn in the image, e.g. "7-2+4".

  Level = number of operations (1 to 3). Every intermediate value is >= 0, so answers
  are non-negative integers (0 to 36).
  """

  name = "arithmetic"
  answer_kind = "number"

  def levels(self, image_size):
    return [1, 2, 3]

  def sample(self, rng, level, image_size):
    while True:
      digits = [int(d) for d in rng.integers(0, 10, size=level + 1)]
      ops = [str(o) for o in rng.choice(["+", "-"], size=level)]
      expression = str(digits[0]) + "".join(o + str(d) for o, d in zip(ops, digits[1:]))
      prefixes = [expression[:i] for i in range(1, len(expression) + 1, 2)]
      if all(evaluate(p) >= 0 for p in prefixes):
        break
    scale = image_size // render.IMAGE_MULTIPLE
    width, height = render.text_width(expression, scale), render.GLYPH_HEIGHT * scale
    x = int(rng.integers(0, image_size - width + 1))
    y = int(rng.integers(0, image_size - height + 1))
    return {"expression": expression, "x": x, "y": y, "scale": scale}

  def render(self, scene, image_size):
    image, _ = render.canvas(image_size)
    render.draw_text(image, scene["expression"], scene["x"], scene["y"], scene["scale"])
    return image

  def question(self, scene):
    return "what is the value?"

  def answer(self, scene):
    return str(evaluate(scene["expression"]))

  def caption(self, scene):
    return f"the image shows {scene['expression']}."


# ------------------------------------------------------------------ bar charts


class _BarTask(Task):
  """2 to 5 bars of distinct colours and distinct integer heights 1 to 9."""

  def levels(self, image_size):
    return [2, 3, 4, 5]  # level = number of bars

  def _bars(self, rng, level):
    colors = rng.choice(BAR_COLORS, size=level, replace=False)
    values = rng.choice(np.arange(1, 10), size=level, replace=False)
    return [{"color": str(c), "value": int(v)} for c, v in zip(colors, values)]

  def render(self, scene, image_size):
    image, draw = render.canvas(image_size)
    for x0, x1, y0, y1, color in bar_boxes(scene["bars"], image_size):
      draw.rectangle((x0, y0, x1, y1), fill=render.PALETTE[color])
    return image

  def caption(self, scene):
    return "bars from left are " + ", ".join(f"{b['color']} {b['value']}"
                                          for b in scene["bars"]) + "."


def bar_geometry(num_bars: int, image_size: int) -> tuple[int, int, int]:
  """(margin, slot width, pixels per unit of height)."""
  margin = max(1, image_size // 28)
  return margin, (image_size - 2 * margin) // num_bars, (image_size - 2 * margin) // 10


def bar_boxes(bars: list[dict[str, Any]], image_size: int):
  """Inclusive pixel boxes (x0, x1, y0, y1, color) of the bars, left to right."""
  margin, slot, unit = bar_geometry(len(bars), image_size)
  width = max(1, slot * 2 // 3)  # the rest of the slot is the gap to the next bar
  bottom = image_size - margin - 1
  for i, bar in enumerate(bars):
    x0 = margin + i * slot + (slot - width) // 2
    yield x0, x0 + width - 1, bottom - bar["value"] * unit + 1, bottom, bar["color"]


@register_task
class BarTallest(_BarTask):
  name = "bar_tallest"
  answer_kind = "color"

  def sample(self, rng, level, image_size):
    return {"bars": self._bars(rng, level)}

  def question(self, scene):
    return "which bar is tallest?"

  def answer(self, scene):
    return max(scene["bars"], key=lambda b: b["value"])["color"]


@register_task
class BarDifference(_BarTask):
  name = "bar_difference"
  answer_kind = "number"

  def sample(self, rng, level, image_size):
    bars = self._bars(rng, level)
    i, j = (int(k) for k in rng.choice(level, size=2, replace=False))
    taller, shorter = sorted((i, j), key=lambda k: -bars[k]["value"])
    return {"bars": bars, "query": [bars[taller]["color"], bars[shorter]["color"]]}

  def question(self, scene):
    taller, shorter = scene["query"]
    return f"how much taller is {taller} than {shorter}?"

  def answer(self, scene):
    value = {b["color"]: b["value"] for b in scene["bars"]}
    taller, shorter = scene["query"]
    return str(value[taller] - value[shorter])


# ------------------------------------------------------------------ language priors

# Questions answerable without looking: a constant fact, or the answer in the text.
_CONSTANT_QUESTIONS = {
    "number": (("how many sides has a triangle?", "3"), ("how many sides has a square?", "4")),
    "color": (("what color is the sky?", "blue"), ("what color is grass?", "green"),
              ("what color is blood?", "red"), ("what color is a lemon?", "yellow"),
              ("what color is snow?", "white")),
}


def language_prior_question(rng: np.random.Generator, answer_kind: str) -> tuple[str, str]:
  """A (question, answer) that the image is irrelevant to, with answers of `answer_kind`."""
  constants = _CONSTANT_QUESTIONS[answer_kind]
  if answer_kind == "number" and rng.random() < 0.5:
    total = int(rng.integers(1, 10))  # 1 to 9, the counting tasks' answer range
    a = int(rng.integers(0, total + 1))
    return f"what is {a}+{total - a}?", str(total)
  question, answer = constants[int(rng.integers(len(constants)))]
  return question, answer
