"""What a curation run shows: the pass-rate histogram (PNG + JSON) and a counts report.

    hist = histogram_json(curation)            # the U shape, bin by bin
    plot_histogram(hist, workdir / "histogram.png")
    counts = counts_report(curation)           # JSON-ready
    print(format_counts(counts))               # the same as a table

Bins are the possible numbers of correct answers 0..K (pass rates c/K), not float
ranges: with K samples nothing else can occur, and each bin is wholly kept or dropped.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display (CLI runs on headless machines)
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from dprl.curation import difficulty
from dprl.curation.difficulty import Curation


def histogram_json(curation: Curation) -> dict[str, Any]:
  """The histogram over all scored prompts: per bin, whether it is kept, and how many of
  its prompts went to each stage (a bin can be shared when the split cuts a tie)."""
  bounds = curation.bounds
  k = bounds.num_samples
  per_stage = {stage: collections.Counter(r.metadata["curation"]["num_correct"]
                                          for r in records)
               for stage, records in (("stage1", curation.stage1), ("stage2", curation.stage2))}
  return {
      "num_samples": k,
      "num_prompts": curation.num_prompts,
      "min_correct": bounds.min_correct,
      "max_correct": bounds.max_correct,
      "bins": [{"num_correct": c, "pass_rate": c / k, "count": int(curation.histogram[c]),
                "kept": bounds.keeps(c), "stage1": per_stage["stage1"][c],
                "stage2": per_stage["stage2"][c]} for c in range(k + 1)],
  }


def plot_histogram(hist: dict[str, Any], path: str | os.PathLike,
                   title: str = "Base-model pass rate over prompts") -> pathlib.Path:
  """Bars per number of correct answers: dropped grey, stage 2 dark, stage 1 light."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  bins = hist["bins"]
  x = [b["num_correct"] for b in bins]
  dropped = [0 if b["kept"] else b["count"] for b in bins]
  stage2 = [b["stage2"] for b in bins]
  stage1 = [b["stage1"] for b in bins]
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  style = dict(edgecolor="black", linewidth=0.5)
  ax.bar(x, dropped, color="lightgrey", label="dropped", **style)
  ax.bar(x, stage2, color="tab:red", label="stage 2", **style)
  ax.bar(x, stage1, bottom=stage2, color="tab:blue", label="stage 1", **style)
  k = hist["num_samples"]
  ax.set_xticks(range(k + 1))
  ax.set_xticklabels([f"{c}\n{c / k:.2f}" for c in range(k + 1)], fontsize=7)
  ax.set_xlabel(f"correct answers of {k} (pass rate)")
  ax.set_ylabel("prompts")
  ax.set_title(f"{title}\n{hist['num_prompts']} prompts; kept {hist['min_correct']}.."
               f"{hist['max_correct']} correct", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def counts_report(curation: Curation) -> dict[str, Any]:
  """Counts of prompts: scored, dropped by reason, kept, per stage, hinted; by source."""
  by_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for stage, records in (("stage1", curation.stage1), ("stage2", curation.stage2)):
    for record in records:
      by_source[record.source][stage] += 1
      by_source[record.source]["hinted"] += bool(record.metadata.get("hint"))
  kept = len(curation.stage1) + len(curation.stage2)
  return {
      "num_samples": curation.bounds.num_samples,
      "min_correct": curation.bounds.min_correct,
      "max_correct": curation.bounds.max_correct,
      "kept_pass_rates": [curation.bounds.low, curation.bounds.high],
      "scored": curation.num_prompts,
      "dropped": {reason: len(ids) for reason, ids in curation.dropped.items()},
      "kept": kept,
      "stage1": len(curation.stage1),
      "stage2": len(curation.stage2),
      "stage2_hinted": curation.num_hinted,
      "by_source": {source: {key: int(counts[key]) for key in ("stage1", "stage2", "hinted")}
                    for source, counts in sorted(by_source.items())},
  }


def format_counts(report: dict[str, Any]) -> str:
  """The counts report as an aligned two-column table."""
  k = report["num_samples"]
  low, high = report["kept_pass_rates"]
  rows = [("prompts scored", report["scored"])]
  rows += [(f"dropped: {reason}", report["dropped"][reason])
           for reason in difficulty.DROP_REASONS]
  rows += [(f"kept ({report['min_correct']}..{report['max_correct']} of {k} correct, "
            f"pass rate {low:.3f}..{high:.3f})", report["kept"]),
           ("stage 1 (moderate)", report["stage1"]),
           ("stage 2 (moderate to hard)", report["stage2"]),
           ("stage 2 with a difficulty hint", report["stage2_hinted"])]
  for source, counts in report["by_source"].items():
    rows.append((f"  {source}: stage1 / stage2 / hinted",
                 f"{counts['stage1']} / {counts['stage2']} / {counts['hinted']}"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)


def write_json(payload: dict[str, Any], path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  tmp.replace(path)  # never a half-written report
  return path
