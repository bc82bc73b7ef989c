"""`python -m dprl.curriculum --config configs/infi_mmr.py:tiny --workdir DIR`."""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from dprl import cli
from dprl.curriculum.runner import run_curriculum


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  summary = run_curriculum(flags.FLAGS.config, flags.FLAGS.workdir)
  print(json.dumps(summary, indent=2))


def run() -> None:
  config_flags.DEFINE_config_file("config", None, "A curriculum config, e.g. "
                                  "configs/infi_mmr.py:tiny.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Each phase trains in WORKDIR/<phase>.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
