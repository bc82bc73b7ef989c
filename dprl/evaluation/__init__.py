"""Sampling-and-scoring rollouts over records, and the metrics computed from them."""

from dprl.evaluation.metrics import format_table, pass_at_k, summarize
from dprl.evaluation.rollout import (ItemResult, ResultWriter, load_results, rollout_records,
                                     tiny_model_config_for)

__all__ = ["ItemResult", "ResultWriter", "format_table", "load_results", "pass_at_k",
           "rollout_records", "summarize", "tiny_model_config_for"]
