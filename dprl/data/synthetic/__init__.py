"""Synthetic visual-reasoning benchmark: procedurally drawn images with exact answers.

Task families (registry `TASKS`): count_color, count_shape, arithmetic, bar_tallest,
bar_difference. See `generate_split`; `python -m dprl.data.synthetic --help` writes
splits to JSONL + images.
"""

from __future__ import annotations

from dprl.data.synthetic.benchmark import (LANGUAGE_PRIOR_LEVEL, SOURCE, SPLITS, TINY,
                                           content_split, generate_split)
from dprl.data.synthetic.tasks import TASKS, WORDS, Task, get_task, register_task, tokenize_words

__all__ = [
    "LANGUAGE_PRIOR_LEVEL", "SOURCE", "SPLITS", "TASKS", "TINY", "WORDS", "Task",
    "content_split", "generate_split", "get_task", "register_task", "tokenize_words",
]
