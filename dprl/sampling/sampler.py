"""Jitted multimodal generation with a preallocated KV cache.

One jit holds the whole generation: prefill (the vision tower runs once; each prompt is
prefilled once and its keys/values copied into its G samples' caches), then a
`lax.while_loop` of single-token decode steps over a preallocated cache, one array per
layer, which XLA updates in place; the decode steps read per-layer weight copies made once
a call (`SamplingConfig.unstack_layers`). Prompt widths (to the data pipeline's buckets or
`prompt_width`'s powers of two and half steps) and patch counts (powers of two) are
bucketed so that new shapes, and recompiles, are rare.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dprl.models.qwen2_5_vl import Qwen2_5_VL, check_image_inputs, frame_patch_bound
from dprl.parallel import batches as batches_lib
from dprl.sampling.processors import draw_uniforms, sample_tokens


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  num_samples: int = 1
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  # Decode from per-layer copies of the decoder's stacked weights, in the compute dtype,
  # made once a call. XLA otherwise copies each layer's slice in every step: on an H200 at
  # Qwen2.5-VL-3B's shapes (64 rows, bf16) a step took 6.4 ms that way and 3.5 ms with the
  # copies (benchmarks/results/h200_3b_*.json), which cost one more set of the decoder's
  # weights on the device while sampling (peak 13.1 vs 8.6 GiB there). False where memory
  # is short.
  unstack_layers: bool = True

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if self.num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


class SampleOutput(NamedTuple):
  tokens: jax.Array  # [B*G, N] int32, pad_token_id after a row's end
  logprobs: jax.Array  # [B*G, N] float32, 0 after a row's end
  lengths: jax.Array  # [B*G] int32, generated tokens including the EOS token
  mask: jax.Array  # [B*G, N] int32, 1 on generated tokens


def bucket(n: int, minimum: int = 16) -> int:
  """The power of two >= n (and >= minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_width(n: int, prompt_buckets: Sequence[int] | None = None) -> int:
  """The width `generate` pads n-token prompts to: the smallest of `prompt_buckets` that
  holds them (the data pipeline's length buckets, whose batches then keep their width),
  else the smallest power of two or 1.5 x power of two (16, 24, 32, 48, 64, 96, ...) that
  does. Half steps pad at most a third, not half: a 34-token prompt takes 48 columns, not
  64, twice as many compiled widths at most."""
  fits = [b for b in prompt_buckets or () if b >= n]
  if fits:
    return min(fits)
  power = bucket(n)
  half_step = 3 * power // 4
  return half_step if n <= half_step and half_step >= 16 else power


def _sample(model: Qwen2_5_VL, input_ids, attention_mask, pixel_values, image_grid_thw, key, *,
            cfg: SamplingConfig, mesh: Mesh | None, max_frame_patches: int | None):
  mcfg = model.config
  p, t = input_ids.shape
  g, n = cfg.num_samples, cfg.max_new_tokens
  s = t + n
  b = p * g

  def constrain(x, spec):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  prompt_mask = attention_mask.astype(jnp.int32)
  out = model(input_ids, attention_mask=prompt_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
              logits_to_keep=1, max_frame_patches=max_frame_patches, return_kv=True)

  # Each prompt's keys/values fill the first T slots of its G samples' caches (prompt-major
  # rows): the prompt is prefilled once, not G times.
  rep = lambda x: jnp.repeat(x, g, axis=0)
  cache = out.cache.extend(s, g, mcfg.dtype).map(lambda c: constrain(c, P("data", "tensor", None, None)))
  key_mask = jnp.concatenate([rep(prompt_mask), jnp.zeros((b, n), jnp.int32)], axis=1)
  key_mask = constrain(key_mask, P("data", None))
  logits = rep(out.logits[:, -1])
  first_pos = rep(prompt_mask.sum(1) + out.rope_deltas)  # [B*G], the first new token's position
  eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
  # Sliced out of the stacked weights and fused once, outside the loop (SamplingConfig.unstack_layers).
  decode_weights = model.model.decode_weights(mcfg.dtype) if cfg.unstack_layers else None
  head = model.head_weight()

  # Every step's uniforms drawn at once ([N, B*G]): a key split and a threefry inside
  # the loop were ~10 of a tiny model's ~110 ops a decode step.
  uniforms = constrain(draw_uniforms(key, (n, b)), P(None, "data"))

  # Column writes as dynamic_update_slice, not `.at[:, i].set` (a scatter, which XLA
  # turns into the same update plus a bounds check: three more ops a step).
  write = lambda a, col, j: jax.lax.dynamic_update_slice_in_dim(a, col[:, None].astype(a.dtype), j, axis=1)

  def emit(i, logits, done, tokens, logprobs):
    """Samples column i from logits [B, V]; rows already done get padding."""
    tok, lp = sample_tokens(uniforms[i], logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    tok = jnp.where(done, cfg.pad_token_id, tok)
    tokens = write(tokens, tok, i)
    logprobs = write(logprobs, jnp.where(done, 0.0, lp), i)
    return tok, done | jnp.isin(tok, eos), tokens, logprobs

  def cond(carry):
    i, done = carry[0], carry[4]
    return (i < n - 1) & ~jnp.all(done)

  def body(carry):
    i, cache, key_mask, logits, done, tokens, logprobs = carry
    tok, done, tokens, logprobs = emit(i, logits, done, tokens, logprobs)
    key_mask = write(key_mask, jnp.ones((b,), jnp.int32), t + i)
    pos = jnp.broadcast_to((first_pos + i)[None, :, None], (3, b, 1))
    step = model(tok[:, None], attention_mask=key_mask, position_ids=pos, cache=cache, cache_index=t + i,
                 decode_weights=decode_weights, head=head)
    return (i + 1, step.cache, key_mask, step.logits[:, -1], done, tokens, logprobs)

  carry = (jnp.int32(0), cache, key_mask, logits, jnp.zeros((b,), bool),
           jnp.full((b, n), cfg.pad_token_id, jnp.int32), jnp.zeros((b, n), jnp.float32))
  i, _, _, logits, done, tokens, logprobs = jax.lax.while_loop(cond, body, carry)
  # The last token is drawn after the loop, which so runs no forward pass whose logits go
  # unused. If every row ended earlier, this writes padding over padding.
  _, _, tokens, logprobs = emit(i, logits, done, tokens, logprobs)
  is_eos = jnp.isin(tokens, eos)
  first_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, i + 1)
  lengths = first_eos.astype(jnp.int32)
  mask = (jnp.arange(n)[None, :] < lengths[:, None]).astype(jnp.int32)
  return SampleOutput(tokens, logprobs, lengths, mask)


@functools.lru_cache(maxsize=32)
def _compiled(cfg: SamplingConfig, mesh: Mesh | None, max_frame_patches: int | None):
  """`_sample` jitted with the model as its first argument, a pytree (NNX modules are):
  jit flattens it in ~0.1 ms, where `nnx.split` walks the module graph in ~0.8 (the
  tiny benchmark model, whose whole `generate` call now takes ~13 ms). The model's structure is part
  of jit's cache key, as the graphdef would be."""
  return jax.jit(functools.partial(_sample, cfg=cfg, mesh=mesh, max_frame_patches=max_frame_patches))


@functools.lru_cache(maxsize=32)
def _compiled_from_state(graphdef, cfg: SamplingConfig, mesh: Mesh | None, max_frame_patches: int | None):
  def fn(state, *args):
    return _sample(nnx.merge(graphdef, state), *args, cfg=cfg, mesh=mesh, max_frame_patches=max_frame_patches)
  return jax.jit(fn)


def jitted(graphdef: nnx.GraphDef, cfg: SamplingConfig, mesh: Mesh | None, max_frame_patches: int | None):
  """The jitted generation `generate` runs, taking the model's split state, for
  ahead-of-time lowering from abstract shapes (`dprl.plan`; `generate` itself passes
  the module):

      fn(state, input_ids [P, T], attention_mask [P, T], pixel_values [N, D] | None,
         image_grid_thw [I, 3] | None, key) -> SampleOutput

  with `graphdef, state = nnx.split(model)`, prompts sharded over `data` (when `mesh` is
  given), images replicated, T and N bucketed as `generate` buckets them (`prompt_width`,
  `bucket_images`), and `max_frame_patches = frame_patch_bound(image_grid_thw)`.
  """
  return _compiled_from_state(graphdef, cfg, mesh, max_frame_patches)


def bucket_images(pixel_values: np.ndarray, image_grid_thw: np.ndarray, merge_size: int):
  """A batch's images padded to a power-of-two patch count (at least 64), as `generate`
  pads them: (pixel_values [bucket, D], image_grid_thw [I (+1), 3])."""
  return _pad_patches(pixel_values, image_grid_thw, bucket(pixel_values.shape[0], 64), merge_size)


def _pad_prompts(input_ids: np.ndarray, attention_mask: np.ndarray, length: int):
  """Left-pads to `length` (the prompt bucket)."""
  extra = length - input_ids.shape[1]
  if extra == 0:
    return input_ids, attention_mask
  return (np.pad(input_ids, ((0, 0), (extra, 0))), np.pad(attention_mask, ((0, 0), (extra, 0))))


def _pad_patches(pixel_values: np.ndarray, grid: np.ndarray, total: int, merge: int):
  """Appends a dummy image of `total - N` patches that no token refers to.

  Its features are computed and never scattered (the k-th image token takes the k-th
  feature row), so the real images are unaffected; it only fixes the shape.
  """
  extra = total - pixel_values.shape[0]
  if extra == 0:
    return pixel_values, grid
  pv = np.concatenate([pixel_values, np.zeros((extra, pixel_values.shape[1]), pixel_values.dtype)])
  # Frames of one merge unit each, so no attention segment grows with the padding.
  dummy = np.array([[extra // (merge * merge), merge, merge]], grid.dtype)
  return pv, np.concatenate([grid, dummy])


def _prompts_of_all_processes(input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values, image_grid_thw,
                              patch_dim: int):
  """Every process's prompts and images, concatenated in process order (the same arrays on
  every process), and the rows of this process's prompts among them.

  The prompts are split over `data` only, so with data smaller than the device count (FSDP)
  a device holds prompts of several hosts: each host needs them all, not just its own.
  """
  width = int(batches_lib.every_process(input_ids.shape[1]).max())
  input_ids, attention_mask = _pad_prompts(input_ids, attention_mask, width)
  counts = batches_lib.every_process(input_ids.shape[0])
  start = int(counts[:jax.process_index()].sum())
  rows = slice(start, start + input_ids.shape[0])
  if pixel_values is None:
    pixel_values, image_grid_thw = np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int32)
  pixel_values = batches_lib.concat_across_processes(np.asarray(pixel_values, np.float32))
  image_grid_thw = batches_lib.concat_across_processes(np.asarray(image_grid_thw, np.int32).reshape(-1, 3))
  if not len(image_grid_thw):
    pixel_values = image_grid_thw = None
  return (batches_lib.concat_across_processes(input_ids), batches_lib.concat_across_processes(attention_mask),
          pixel_values, image_grid_thw, rows)


def _rows_of(out: SampleOutput, rows: slice, num_samples: int) -> SampleOutput:
  """This process's samples (prompt-major rows of its prompts) of a global output, on the host."""
  samples = slice(rows.start * num_samples, rows.stop * num_samples)
  return SampleOutput(*(batches_lib.to_host(x)[samples] for x in out))


def generate(model: Qwen2_5_VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | jax.Array = 0, eos_token_id: int | Sequence[int] | None = None,
             num_samples: int = 1, pad_token_id: int | None = None, mesh: Mesh | None = None,
             bucket_prompts: bool = True, prompt_buckets: Sequence[int] | None = None,
             unstack_layers: bool = True) -> SampleOutput:
  """Samples `num_samples` continuations of each left-padded prompt.

  Args:
    input_ids: [P, T] left-padded prompts; attention_mask: [P, T] (1 = real token).
    pixel_values, image_grid_thw: the prompts' images in transformers' processor format.
    eos_token_id: id(s) that end a row (default: the model config's eos_token_id).
    bucket_prompts: pad the prompts' width (`prompt_width`) and the images' patch count
      (`bucket_images`) to few distinct shapes, so that jit compiles rarely.
    prompt_buckets: the widths prompts may be padded to, e.g. the data pipeline's length
      buckets (a pipeline batch of width 40 is not padded to 48 then); None:
      `prompt_width`'s defaults.
    unstack_layers: decode from per-layer weight copies made once a call (faster; one more
      copy of the decoder's weights on the device while sampling): `SamplingConfig`.
    seed: an int or a PRNG key.
    mesh: if given, prompts are split over `data` and the cache over `tensor` (heads).
      With several processes (multi-host) and a mesh, every argument is this process's
      share (its prompts and their images, as its pipeline gave them; the processes
      may differ in prompt width and count): they are gathered into one global batch
      in process order, and the output holds this process's samples only.
  Returns:
    SampleOutput with rows ordered prompt-major: row p * num_samples + j is sample j of prompt p;
    NumPy arrays of this process's prompts with several processes.
  """
  mcfg = model.config
  input_ids = np.asarray(input_ids)
  attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be [P, T]")
  if attention_mask[:, -1].min() == 0:
    raise ValueError("prompts must be left-padded: attention_mask has padding in the last column")
  check_image_inputs(input_ids, pixel_values, image_grid_thw, mcfg)
  if eos_token_id is None:
    eos_token_id = mcfg.text.eos_token_id
  eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
  pad = pad_token_id if pad_token_id is not None else (mcfg.text.pad_token_id or (eos[0] if eos else 0))
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                       top_k=int(top_k), num_samples=num_samples, eos_token_ids=eos, pad_token_id=int(pad),
                       unstack_layers=bool(unstack_layers))
  cfg.validate()
  rows = None  # several processes: this process's prompts within the global batch
  if mesh is not None and jax.process_count() > 1:
    input_ids, attention_mask, pixel_values, image_grid_thw, rows = _prompts_of_all_processes(
        input_ids, attention_mask, pixel_values, image_grid_thw, mcfg.vision.patch_dim)
  if bucket_prompts:
    input_ids, attention_mask = _pad_prompts(input_ids, attention_mask,
                                             prompt_width(input_ids.shape[1], prompt_buckets))
  if pixel_values is not None:
    pixel_values = np.asarray(pixel_values, np.float32)
    image_grid_thw = np.asarray(image_grid_thw, np.int32)
    if bucket_prompts:
      pixel_values, image_grid_thw = bucket_images(pixel_values, image_grid_thw, mcfg.vision.spatial_merge_size)
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  # Host arrays: the jitted call transfers them (a jnp conversion first is one more
  # dispatch each), and with several processes host values (the same on every process)
  # place onto devices of other processes too.
  batch_args = [np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)]
  if mesh is not None:
    batch_sharding = NamedSharding(mesh, P("data"))
    batch_args = [jax.device_put(a, batch_sharding) for a in batch_args]
  bound = frame_patch_bound(image_grid_thw)
  out = _compiled(cfg, mesh, bound)(model, *batch_args, pixel_values, image_grid_thw, key)
  return out if rows is None else _rows_of(out, rows, num_samples)
