"""Shared helpers for benchmarks: subprocess isolation, peak memory, tables, JSON."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any


def peak_rss_mb() -> float:
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, args: list[str]) -> dict[str, Any]:
  """Runs `script args` in a fresh Python so each engine's peak memory is its own.

  The child prints one JSON line prefixed with RESULT: on stdout.
  """
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
  proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT:"):
      return json.loads(line[len("RESULT:"):])
  raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
  return "" if v is None else str(v)
