"""`generate_split`: deterministic train/test splits of the synthetic benchmark.

Determinism: one NumPy PCG64 stream per (seed, split, task list), so equal arguments
give equal records (images byte-equal under one Pillow/zlib build, pixel-equal always).

Disjointness: distinct streams alone would not stop the two splits from drawing the
same small scene (a lone red circle at level 1). Each candidate item is therefore
routed by a hash of its content (task, scene, question): a split only keeps the items
that hash to it, so train and test can never share an item, whatever the seeds and
sizes. Rejected candidates cost one scene sample each (no rendering).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Sequence

import numpy as np

from dprl.data.records import Record
from dprl.data.synthetic import render
from dprl.data.synthetic.tasks import get_task, language_prior_question

SPLITS = ("train", "test")
SOURCE = "synthetic"
LANGUAGE_PRIOR_LEVEL = 0  # `Record.level` of items answerable without the image

# The setting the 2-core CPU demo learned on (docs/tiny-rl-facts.md).
TINY = dict(task="count_color", image_size=56)


def content_split(task: str, scene: dict, question: str) -> str:
  """The split that owns an item, from a hash of what the model would see."""
  key = json.dumps([task, scene, question], sort_keys=True, separators=(",", ":"))
  return SPLITS[hashlib.sha256(key.encode()).digest()[0] & 1]


def generate_split(task: str | Sequence[str], split: str, num_items: int, seed: int,
                   image_size: int = 56, language_prior_fraction: float = 0.15,
                   levels: Sequence[int] | None = None,
                   max_tries_per_item: int = 1000) -> list[Record]:
  """Generates `num_items` records of one split.

  Args:
    task: a name in `TASKS` or a list of names; items cycle over the tasks evenly.
    split: "train" or "test".
    num_items: how many records.
    seed: the stream; the same arguments always give the same records.
    image_size: square image side in pixels, a multiple of 28 (56 for the tiny demo).
    language_prior_fraction: exactly round(fraction * num_items) items get a question
      that the image is irrelevant to (`metadata["language_prior"] = True`, level 0).
    levels: restrict difficulty levels (default: all the task supports at this size);
      levels are spread evenly over the items of each task.
    max_tries_per_item: bound on candidates rejected by the content-hash split routing.

  Returns:
    Records with one PNG image, `caption`, `text_question` (caption then question),
    `level`, and `metadata` {"task", "split", "seed", "language_prior", "scene"}.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not 0.0 <= language_prior_fraction <= 1.0:
    raise ValueError(f"language_prior_fraction must be in [0, 1], got {language_prior_fraction}")
  render.check_image_size(image_size)
  names = [task] if isinstance(task, str) else list(task)
  tasks = [get_task(n) for n in names]
  level_lists = []
  for t in tasks:
    supported = t.levels(image_size)
    chosen = list(levels) if levels is not None else supported
    bad = sorted(set(chosen) - set(supported))
    if bad:
      raise ValueError(f"task {t.name!r} at image_size {image_size} supports levels "
                       f"{supported}, not {bad}")
    level_lists.append(chosen)

  stream = zlib.crc32(",".join(names).encode())
  rng = np.random.default_rng([seed, SPLITS.index(split), stream])
  # Even spread: item i gets task i mod T and that task's levels in turn, then shuffle.
  plan = [(i % len(tasks), level_lists[i % len(tasks)][(i // len(tasks)) %
                                                      len(level_lists[i % len(tasks)])])
          for i in range(num_items)]
  plan = [plan[i] for i in rng.permutation(num_items)]
  num_prior = round(language_prior_fraction * num_items)
  prior = set(int(i) for i in rng.choice(num_items, size=num_prior, replace=False))

  records = []
  for index, (task_index, level) in enumerate(plan):
    t = tasks[task_index]
    for _ in range(max_tries_per_item):
      scene = t.sample(rng, level, image_size)
      if index in prior:
        question, answer = language_prior_question(rng, t.answer_kind)
      else:
        question, answer = t.question(scene), t.answer(scene)
      if content_split(t.name, scene, question) == split:
        break
    else:
      raise RuntimeError(f"no {split} item for task {t.name!r} level {level} in "
                         f"{max_tries_per_item} tries")
    caption = t.caption(scene)
    records.append(Record(
        id=f"{t.name}-{split}-{seed}-{index}",
        question=question,
        answer=answer,
        images=(render.encode_png(t.render(scene, image_size)),),
        caption=caption,
        text_question=f"{caption} {question}",
        source=SOURCE,
        level=LANGUAGE_PRIOR_LEVEL if index in prior else level,
        metadata={"task": t.name, "split": split, "seed": seed,
                  "language_prior": index in prior, "scene": scene,
                  "image_size": image_size}))
  return records
