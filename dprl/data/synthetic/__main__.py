"""Writes synthetic train/test splits as JSONL + PNG folders (the `dprl` reader layout).

  python -m dprl.data.synthetic --out DIR --num-train N --num-test M \
      [--task count_color,arithmetic] [--seed 0] [--image-size 56] \
      [--language-prior-fraction 0.15]

Writes DIR/train.jsonl with DIR/train_images/, and DIR/test.jsonl with DIR/test_images/;
reload with `dprl.data.readers.read_records(path, layout="dprl")`.
"""

from __future__ import annotations

import argparse
import collections
import pathlib

from dprl.data import readers
from dprl.data.synthetic import TASKS, generate_split


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m dprl.data.synthetic",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument("--num-train", required=True, type=int)
  parser.add_argument("--num-test", required=True, type=int)
  parser.add_argument("--task", default="count_color",
                      help=f"comma-separated, from {sorted(TASKS)}")
  parser.add_argument("--seed", default=0, type=int)
  parser.add_argument("--image-size", default=56, type=int)
  parser.add_argument("--language-prior-fraction", default=0.15, type=float)
  args = parser.parse_args(argv)
  tasks = args.task.split(",")
  for split, num in (("train", args.num_train), ("test", args.num_test)):
    records = generate_split(tasks, split, num, args.seed, image_size=args.image_size,
                             language_prior_fraction=args.language_prior_fraction)
    path = readers.write_jsonl(records, args.out / f"{split}.jsonl")
    levels = collections.Counter(r.level for r in records)
    print(f"{path}: {len(records)} records, levels {dict(sorted(levels.items()))}")


if __name__ == "__main__":
  main()
