"""Command-line plumbing shared by the entry points (train, eval, curate, select, demo).

ml_collections' `config_flags` reports a misspelt override (`--config.rl.bta=0`) as a
bare KeyError of the last component; `parse_flags` names the whole path and the keys
that do exist, so the error says which flag is at fault.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags as config_flags_impl


def setup_logging(level: int = logging.WARNING, with_time: bool = False) -> None:
  """The entry points' logging: `level` for dprl's own loggers, warnings only from absl.

  Why: orbax logs every file it reads or writes through absl at INFO (~600 lines in one
  demo run), which would bury the progress bars and the results table.
  """
  fmt = ("%(asctime)s " if with_time else "") + "%(levelname)s %(name)s: %(message)s"
  logging.basicConfig(level=level, format=fmt)
  logging.getLogger("absl").setLevel(logging.WARNING)


def unknown_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> list[str]:
  """Messages for the `--config.a.b=...` arguments that name no key of `config`."""
  problems = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(["config", *walked])
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        problems.append(f"{arg}: unknown config key {path!r} ({where} has no {part!r}; "
                        f"its keys: {known})")
        break
      node, walked = node[part], walked + [part]
  return problems


def config_file_argument(argv: Sequence[str]) -> str | None:
  """The value of --config (`path.py:variant`) in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, with an unknown config key named by its whole path."""
  try:
    return flag_values(list(argv))
  except (flags.Error, AttributeError, KeyError) as e:
    message = str(e)
    config_file = config_file_argument(argv)
    if isinstance(e, (AttributeError, KeyError)) and config_file:
      # What DEFINE_config_file parses: the config file without the overrides.
      config = config_flags_impl.ConfigFileFlagParser(name="config").parse(config_file)
      message = "; ".join(unknown_overrides(config, argv)) or message
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config from `path.py[:variant]`, parsed as `--config` would parse it (configs/ is a
  folder of files, not a package, so recipes built from other recipes load them so)."""
  return config_flags_impl.ConfigFileFlagParser(name="config").parse(spec)
