"""Jitted, sharded generation with a KV cache."""

from dprl.sampling.sampler import SampleOutput, SamplingConfig, bucket, generate, prompt_width

__all__ = ["SampleOutput", "SamplingConfig", "bucket", "generate", "prompt_width"]
