"""Hugging Face safetensors checkpoints <-> dprl parameters.

Names: Qwen2.5-VL checkpoints on the hub use `visual.*`, `model.*`, `lm_head.weight`
(what `save_pretrained` writes); transformers 5.x modules name them
`model.visual.*`, `model.language_model.*`. Both load; we write the hub layout.
Layouts: torch Linear weights are [out, in], ours [in, out]; the patch embedding's Conv3d
[D, C, T, P, P] is one matmul [C*T*P*P, D]; stacked layers gain a leading layer axis.
Loading places each tensor straight into its sharding (`make_array_from_callback` reads
only the slices a device needs), so no device ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from dprl.models import config as config_lib
from dprl.models import sharding as sharding_lib
from dprl.models.qwen2_5_vl import Qwen2_5_VL, abstract

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model; the message names the tensor and file."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """How one dprl parameter is stored in a HF checkpoint.

  hf_name: the HF name; `{i}` stands for the layer index of stacked parameters.
  to_hf / from_hf: layout transforms of one (unstacked) tensor.
  """

  hf_name: str
  stacked: bool
  to_hf: Callable[[np.ndarray], np.ndarray]
  from_hf: Callable[[np.ndarray], np.ndarray]


_identity = lambda x: x
_transpose = lambda x: np.ascontiguousarray(x.T)


def tensor_map(path: str, cfg: config_lib.ModelConfig) -> TensorMap:
  """The HF tensor behind the dprl parameter at dotted `path`."""
  if path == "lm_head":
    return TensorMap("lm_head.weight", False, _transpose, _transpose)
  if path == "visual.patch_embed.kernel":
    v = cfg.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return TensorMap("visual.patch_embed.proj.weight", False,
                     lambda k: np.ascontiguousarray(k.T.reshape(conv_shape)),
                     lambda w: np.ascontiguousarray(w.reshape(w.shape[0], -1).T))
  name = path
  name = re.sub(r"^visual\.blocks\.", "visual.blocks.{i}.", name)
  name = re.sub(r"^model\.layers\.", "model.layers.{i}.", name)
  name = name.replace("visual.merger.fc1", "visual.merger.mlp.0").replace("visual.merger.fc2", "visual.merger.mlp.2")
  leaf = name.rsplit(".", 1)[-1]
  name = name.rsplit(".", 1)[0] + {"kernel": ".weight", "scale": ".weight", "embedding": ".weight",
                                    "bias": ".bias"}[leaf]
  transform = _transpose if leaf == "kernel" else _identity
  return TensorMap(name, "{i}" in name, transform, transform)


def _alternative_names(name: str) -> list[str]:
  """transformers 5.x module names of a hub-layout tensor name."""
  if name.startswith("visual."):
    return [name, "model." + name]
  if name.startswith("model."):
    return [name, "model.language_model." + name[len("model."):]]
  return [name]


class SafetensorsReader:
  """Lazy access to the tensors of a single-file or index-sharded safetensors checkpoint."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, "np") as f:
        self.files = {k: single for k in f.keys()}
    else:
      raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for file in set(self.files.values()):
      if not os.path.exists(file):
        raise CheckpointError(f"{path}: the index names {os.path.basename(file)}, which does not exist")
    self.used: set[str] = set()

  def resolve(self, name: str) -> str:
    for candidate in _alternative_names(name):
      if candidate in self.files:
        self.used.add(candidate)
        return candidate
    raise CheckpointError(f"{self.path}: checkpoint is missing tensor {name!r}")

  def shape(self, name: str) -> tuple[int, ...]:
    key = self.resolve(name)
    with safe_open(self.files[key], "np") as f:
      return tuple(f.get_slice(key).get_shape())

  @functools.lru_cache(maxsize=8)
  def read(self, name: str) -> np.ndarray:
    key = self.resolve(name)
    with safe_open(self.files[key], "np") as f:
      return f.get_tensor(key)


def _expected_hf_shape(tmap: TensorMap, shape: tuple[int, ...]) -> tuple[int, ...]:
  one = shape[1:] if tmap.stacked else shape
  return tmap.to_hf(np.empty(one, np.int8)).shape


def load_pretrained(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None, mesh=None,
                    **config_overrides: Any) -> Qwen2_5_VL:
  """Builds the model abstractly and fills every parameter from the checkpoint at `path`."""
  cfg = config_lib.load_hf_config(path).replace(
      dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
  reader = SafetensorsReader(path)
  graphdef, abs_state = nnx.split(abstract(cfg))

  def load_leaf(key_path, leaf):
    pstr = sharding_lib.path_str(key_path)
    tmap = tensor_map(pstr, cfg)
    shape, np_dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype)
    n = shape[0] if tmap.stacked else 1
    names = [tmap.hf_name.format(i=i) for i in range(n)] if tmap.stacked else [tmap.hf_name]
    expected = _expected_hf_shape(tmap, shape)
    for name in names:
      found = reader.shape(name)
      if found != expected:
        raise CheckpointError(f"{reader.files[reader.resolve(name)]}: tensor {name!r} has shape "
                              f"{found}, the model (config.json) expects {expected}")

    def layer(i: int) -> np.ndarray:
      return tmap.from_hf(reader.read(names[i])).astype(np_dtype)

    def block(index) -> np.ndarray:
      if not tmap.stacked:
        return layer(0)[index]
      layer_ids = range(*index[0].indices(n))
      return np.stack([layer(i)[index[1:]] for i in layer_ids])

    if mesh is not None:
      sharding = jax.sharding.NamedSharding(mesh, sharding_lib.spec_for(pstr, shape, mesh))
    else:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(shape, sharding, block)

  state = jax.tree_util.tree_map_with_path(load_leaf, abs_state)
  unused = sorted(set(reader.files) - reader.used)
  if cfg.tie_word_embeddings:
    unused = [u for u in unused if u != "lm_head.weight"]
  if unused:
    log.warning("%s: %d checkpoint tensors not used by the model: %s", path, len(unused), unused[:10])
  reader.read.cache_clear()
  return nnx.merge(graphdef, state)


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(model: Qwen2_5_VL, out_dir: str, *, max_shard_bytes: int = 5 * 2**30,
                    dtype: Any = None) -> None:
  """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`).

  Every process must call it (gathering sharded arrays is collective); process 0 writes.
  """
  cfg = model.config
  _, state = nnx.split(model)
  tensors: dict[str, np.ndarray] = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    pstr = sharding_lib.path_str(key_path)
    tmap = tensor_map(pstr, cfg)
    value = _to_host(leaf)
    if dtype is not None:
      value = value.astype(jnp.dtype(dtype))
    if tmap.stacked:
      for i in range(value.shape[0]):
        tensors[tmap.hf_name.format(i=i)] = tmap.to_hf(value[i])
    else:
      tensors[tmap.hf_name] = tmap.to_hf(value)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  hf_cfg = config_lib.to_hf_dict(cfg if dtype is None else cfg.replace(param_dtype=dtype))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  metadata = {"format": "pt"}  # transformers refuses files without it
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
    weight_map.update({k: fname for k in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map}, f, indent=2)
