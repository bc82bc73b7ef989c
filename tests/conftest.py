"""Test-wide setup: 8 virtual CPU devices so sharding tests run on any machine.

XLA reads the flag once, when the backend starts, so it must be set before the first
`import jax` anywhere in the test session.

One JAX persistent compilation cache for the session, in a fresh temporary folder (so
nothing carries over between sessions), shared with the subprocesses the end-to-end
tests start through the environment: the CLI, demo, sweep and benchmark tests compile the
same tiny-model programs again and again, and XLA:CPU compilation is most of their time.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dprl-tests-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
