"""Synthetic benchmark: determinism, disjoint splits, answers recomputed from pixels."""

from __future__ import annotations

import collections
import io
import re

import numpy as np
import pytest
from PIL import Image

from dprl.data import readers
from dprl.data import synthetic
from dprl.data.synthetic import __main__ as cli
from dprl.data.synthetic import render, tasks

ALL_TASKS = sorted(synthetic.TASKS)


def _pixels(record) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(record.images[0])).convert("RGB"))


def _components(mask: np.ndarray) -> list[np.ndarray]:
  """4-connected components of a boolean mask, as boolean masks (an independent count)."""
  seen = np.zeros_like(mask)
  found = []
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    component = np.zeros_like(mask)
    stack = [start]
    seen[start] = True
    while stack:
      y, x = stack.pop()
      component[y, x] = True
      for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
          seen[ny, nx] = True
          stack.append((ny, nx))
    found.append(component)
  return found


def _color_mask(pixels, color):
  return np.all(pixels == render.PALETTE[color], axis=-1)


def _shape_of(component: np.ndarray) -> str:
  ys, xs = np.nonzero(component)
  fill = component.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
  return "square" if fill > 0.97 else "circle" if fill > 0.68 else "triangle"


@pytest.fixture(scope="module")
def splits():
  return {t: synthetic.generate_split(t, "test", 120, seed=3, language_prior_fraction=0.0)
          for t in ALL_TASKS}


def test_same_seed_same_records_other_seed_other_records():
  first = synthetic.generate_split(ALL_TASKS, "train", 40, seed=7)
  assert first == synthetic.generate_split(ALL_TASKS, "train", 40, seed=7)
  other = synthetic.generate_split(ALL_TASKS, "train", 40, seed=8)
  assert [r.images for r in first] != [r.images for r in other]


def test_train_and_test_never_share_an_item_even_in_a_tiny_scene_space():
  # Level 1 (one shape) has few distinct scenes: streams alone would collide.
  kwargs = dict(num_items=300, seed=0, levels=[1], language_prior_fraction=0.2)
  train = synthetic.generate_split("count_color", "train", **kwargs)
  test = synthetic.generate_split("count_color", "test", **kwargs)
  seen = {(r.images, r.question) for r in train}
  assert not any((r.images, r.question) in seen for r in test)
  assert len({r.id for r in train} | {r.id for r in test}) == 600


def test_every_pixel_is_black_or_a_palette_colour(splits):
  allowed = {render.BACKGROUND, *render.PALETTE.values()}
  for records in splits.values():
    for record in records[:20]:
      colours = {tuple(c) for c in _pixels(record).reshape(-1, 3)}
      assert colours <= allowed and record.images[0][:4] == b"\x89PNG"
      assert Image.open(io.BytesIO(record.images[0])).size == (56, 56)


@pytest.mark.parametrize("task", ["count_color", "count_red"])
def test_count_color_answer_recounted_from_pixels(splits, task):
  for record in splits[task]:
    pixels = _pixels(record)
    target = re.fullmatch(r"how many (\w+) shapes\?", record.question).group(1)
    assert len(_components(_color_mask(pixels, target))) == int(record.answer)
    assert len(_components(pixels.any(axis=-1))) == record.level


def test_count_red_always_asks_for_red(splits):
  assert {r.question for r in splits["count_red"]} == {"how many red shapes?"}
  answers = {int(r.answer) for r in splits["count_red"]}
  assert answers <= set(range(1, 10)) and len(answers) >= 7  # 9 needs 9 red of 9 objects


def test_count_shape_answer_recounted_from_pixels(splits):
  for record in splits["count_shape"]:
    target = re.fullmatch(r"how many (\w+)s\?", record.question).group(1)
    shapes = [_shape_of(c) for c in _components(_pixels(record).any(axis=-1))]
    assert len(shapes) == record.level
    assert shapes.count(target) == int(record.answer)


def _read_expression(pixels: np.ndarray, scale: int) -> str:
  ink = _color_mask(pixels, "white")
  ys, xs = np.nonzero(ink)
  top, left = ys.min(), xs.min()
  patterns = {v: k for k, v in render.GLYPHS.items()}
  text, x = "", left
  while x < pixels.shape[1]:
    cell = ink[top:top + 5 * scale:scale, x:x + 3 * scale:scale]
    if cell.shape != (5, 3) or not cell.any():
      break
    text += patterns[tuple("".join("1" if v else "0" for v in row) for row in cell)]
    x += 4 * scale
  return text


def test_arithmetic_answer_recomputed_from_the_drawn_digits(splits):
  for record in splits["arithmetic"]:
    expression = _read_expression(_pixels(record), scale=2)
    assert len(re.findall(r"[+-]", expression)) == record.level
    assert int(record.answer) == eval(expression) >= 0  # the test's own arithmetic


def _read_bars(pixels: np.ndarray) -> list[tuple[str, int]]:
  _, _, unit = tasks.bar_geometry(1, pixels.shape[0])
  bars = []
  for color in tasks.BAR_COLORS:
    mask = _color_mask(pixels, color)
    if mask.any():
      ys, xs = np.nonzero(mask)
      assert (np.ptp(ys) + 1) % unit == 0
      bars.append((xs.min(), color, (np.ptp(ys) + 1) // unit))
  return [(color, height) for _, color, height in sorted(bars)]


def test_bar_answers_recomputed_from_bar_heights(splits):
  for record in splits["bar_tallest"]:
    bars = _read_bars(_pixels(record))
    assert len(bars) == record.level
    assert record.answer == max(bars, key=lambda b: b[1])[0]
  for record in splits["bar_difference"]:
    heights = dict(_read_bars(_pixels(record)))
    taller, shorter = re.fullmatch(r"how much taller is (\w+) than (\w+)\?",
                                   record.question).groups()
    assert int(record.answer) == heights[taller] - heights[shorter] > 0


def test_levels_are_spread_evenly(splits):
  for name, records in splits.items():
    counts = collections.Counter(r.level for r in records)
    assert sorted(counts) == synthetic.get_task(name).levels(56)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_caption_states_the_facts_and_text_question_is_caption_then_question(splits):
  for name, records in splits.items():
    for record in records:
      assert record.text_question == f"{record.caption} {record.question}"
      caption = record.caption
      if name in ("count_color", "count_red"):
        colour = record.question.split()[2]
        counts = re.findall(rf"(\d) {colour} (?:circle|square)", caption)
        assert sum(map(int, counts)) == int(record.answer)
      elif name == "count_shape":
        shape = record.question.split()[2]
        assert sum(map(int, re.findall(rf"(\d) \w+ {shape}", caption))) == int(record.answer)
      elif name == "arithmetic":
        assert str(eval(re.search(r"[0-9+-]+", caption).group())) == record.answer
      else:
        heights = {c: int(v) for c, v in re.findall(r"(\w+) (\d)", caption)}
        if name == "bar_tallest":
          assert max(heights, key=heights.get) == record.answer
        else:
          taller, shorter = record.question.split()[4::2]
          assert str(heights[taller] - heights[shorter.rstrip("?")]) == record.answer


@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.5])
def test_language_prior_fraction_is_exact_and_those_answers_ignore_the_image(fraction):
  records = synthetic.generate_split(ALL_TASKS, "train", 200, seed=1,
                                     language_prior_fraction=fraction)
  prior = [r for r in records if r.metadata["language_prior"]]
  assert len(prior) == round(fraction * 200)
  answers_by_question = collections.defaultdict(set)
  for record in prior:
    assert record.level == synthetic.LANGUAGE_PRIOR_LEVEL
    answers_by_question[record.question].add(record.answer)
    sum_question = re.fullmatch(r"what is (\d)\+(\d)\?", record.question)
    if sum_question:
      assert int(record.answer) == sum(map(int, sum_question.groups()))
  # A constant question always has the same answer whatever the image.
  assert all(len(a) == 1 for a in answers_by_question.values())
  assert all(r.level >= 1 for r in records if not r.metadata["language_prior"])


def test_all_texts_use_the_small_fixed_vocabulary():
  records = synthetic.generate_split(ALL_TASKS, "train", 500, seed=2)
  for record in records:
    for text in (record.question, record.answer, record.caption, record.text_question):
      assert set(synthetic.tokenize_words(text)) <= synthetic.WORDS, text
      assert "".join(synthetic.tokenize_words(text)) == text.replace(" ", "")
  tiny = synthetic.generate_split("count_color", "train", 300, seed=0)
  assert all(len(synthetic.tokenize_words(r.question)) <= 7 for r in tiny)
  assert all(len(r.answer) == 1 for r in tiny)


def test_scene_recomputes_the_answer_and_bigger_images_work():
  for record in synthetic.generate_split(ALL_TASKS, "test", 30, seed=4, image_size=112,
                                         language_prior_fraction=0.0):
    task = synthetic.get_task(record.metadata["task"])
    assert task.answer(record.metadata["scene"]) == record.answer
    assert Image.open(io.BytesIO(record.images[0])).size == (112, 112)


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="multiple of 28"):
    synthetic.generate_split("count_color", "train", 1, 0, image_size=50)
  with pytest.raises(ValueError, match="unknown synthetic task"):
    synthetic.generate_split("nope", "train", 1, 0)
  with pytest.raises(ValueError, match="supports levels"):
    synthetic.generate_split("arithmetic", "train", 1, 0, levels=[9])
  with pytest.raises(ValueError, match="split must be"):
    synthetic.generate_split("arithmetic", "val", 1, 0)


def test_cli_writes_jsonl_that_reads_back_equal(tmp_path, capsys):
  cli.main(["--out", str(tmp_path), "--num-train", "12", "--num-test", "5",
            "--task", "count_color,arithmetic", "--seed", "5"])
  train = readers.read_records(tmp_path / "train.jsonl", layout="dprl", strict=True)
  assert train == synthetic.generate_split(["count_color", "arithmetic"], "train", 12, 5)
  assert len(readers.read_records(tmp_path / "test.jsonl", layout="dprl")) == 5
  assert "train.jsonl: 12 records" in capsys.readouterr().out
