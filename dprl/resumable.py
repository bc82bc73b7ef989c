"""Helpers for append-only JSONL outputs that a killed run resumes (rollouts, curation
scores, RAP scores): repairing the last line, and comparing the settings a file was
written with against this run's."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def drop_torn_tail(path: str | os.PathLike) -> None:
  """Cuts a last line a killed run left half-written, so appended lines start clean; a
  whole last line that only lost its newline gets the newline back.

  (A torn line left in place would sit between good lines after the next append.)
  """
  path = pathlib.Path(path)
  if not path.exists() or not path.stat().st_size:
    return
  data = path.read_bytes()
  if data.endswith(b"\n"):
    return
  cut = data.rfind(b"\n") + 1
  try:
    json.loads(data[cut:])
  except ValueError:
    log.warning("%s: dropping a half-written last line (%d bytes); its item is scored again",
                path, len(data) - cut)
    with path.open("r+b") as f:
      f.truncate(cut)
  else:
    with path.open("ab") as f:
      f.write(b"\n")


def changed_settings(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """Dotted names of the settings (sections of one level of keys) that differ."""
  changed = []
  for section in sorted(set(stored) | set(now)):
    before, after = stored.get(section), now.get(section)
    if isinstance(before, dict) and isinstance(after, dict):
      changed += [f"{section}.{key}" for key in sorted(set(before) | set(after))
                  if before.get(key) != after.get(key)]
    elif before != after:
      changed.append(section)
  return changed
