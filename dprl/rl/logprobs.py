"""Teacher-forced log-probabilities of sampled responses, computed in chunks.

The policy, the old policy and the frozen reference all need `log pi(y_t | x, y_<t)` for
every response token. The model runs once over `[prompt | response]`; the final-norm
hidden states of the positions that predict response tokens are then projected to the
vocabulary `chunk_size` positions at a time, so the float32 logits that exist at once are
`[B, chunk_size, V]`, never `[B, T, V]` (for Qwen2.5-VL's 152K vocabulary a whole batch
of full logits is tens of GiB). Under `jax.grad` each chunk is rematerialised
(`jax.checkpoint`), so the backward pass keeps only the hidden states, not the logits.

    logp, entropy = response_logprobs(model, prompt_ids, prompt_mask, response_ids,
                                      response_mask, pixel_values, image_grid_thw,
                                      temperature=1.0)        # [B, N] float32 each

Call it inside `jax.jit` on a model merged from its state (`nnx.merge(graphdef, params)`):
the model's own full-vocabulary logits output is unused there and XLA removes it.

Temperature: the sampler draws from `softmax(logits / temperature)`, so the ratio and KL
are taken under the same tempered distribution (as verl/EasyR1 do).

Vision placeholder tokens in responses: a (young) policy can sample <|image_pad|>. The
model treats every such id in `input_ids` as a slot for the next image feature, counted
over the whole batch, so one in a response would shift the image features and rotary
positions of every later row. Response inputs therefore have image/video placeholder ids
replaced (`VISION_PLACEHOLDER_REPLACEMENT`); the log-prob of the sampled placeholder itself
is exact (it is predicted from earlier positions), later positions of that row are not
what the sampler saw, and `dprl.rl.learner` ends such a response at the placeholder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 128
VISION_PLACEHOLDER_REPLACEMENT = 0  # any id the model does not treat as an image slot


def _check_settings(chunk_size: int, temperature: float) -> None:
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")


def _chunk_logprobs(logits_fn, hidden: jax.Array, targets: jax.Array, temperature: float,
                    with_entropy: bool) -> tuple[jax.Array, jax.Array]:
  """One chunk: hidden [B, C, D], targets [B, C] -> (logp [B, C], entropy [B, C])."""
  logits = logits_fn(hidden).astype(jnp.float32) / temperature  # [B, C, V]
  log_norm = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = target_logits - log_norm
  if not with_entropy:
    return logp, jnp.zeros_like(logp)
  # H = logsumexp(z) - sum softmax(z) z; a metric only, so no gradient through it.
  stopped = jax.lax.stop_gradient(logits)
  probs = jax.nn.softmax(stopped, axis=-1)
  entropy = jax.lax.stop_gradient(log_norm) - jnp.sum(probs * stopped, axis=-1)
  return logp, entropy


def logprobs_from_hidden(logits_fn, hidden: jax.Array, targets: jax.Array, *,
                         temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         with_entropy: bool = True) -> tuple[jax.Array, jax.Array]:
  """Log-probs (and entropies) of `targets` from the hidden states that predict them.

  Args:
    logits_fn: hidden [B, C, D] -> logits [B, C, V] (the model's `logits` method).
    hidden: [B, N, D] final-norm hidden states; position t predicts `targets[:, t]`.
    targets: [B, N] int token ids.
    temperature: logits are divided by it before the softmax.
    chunk_size: positions projected to the vocabulary at once.
    with_entropy: also return per-position entropies (else zeros).

  Returns:
    logp [B, N] float32, entropy [B, N] float32 (nats, stop-gradient).
  """
  _check_settings(chunk_size, temperature)
  batch, length, width = hidden.shape
  if targets.shape != (batch, length):
    raise ValueError(f"targets must be [B, N] = {(batch, length)}, got {targets.shape}")
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  padded = num_chunks * chunk
  targets = targets.astype(jnp.int32)
  if padded != length:
    hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
  # [K, B, C, ...]: scan over chunks so only one chunk's logits are live.
  hidden_chunks = hidden.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
  target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def body(_, xs):
    h, t = xs
    return None, _chunk_logprobs(logits_fn, h, t, temperature, with_entropy)

  _, (logp, entropy) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  logp = logp.swapaxes(0, 1).reshape(batch, padded)[:, :length]
  entropy = entropy.swapaxes(0, 1).reshape(batch, padded)[:, :length]
  return logp, entropy


def response_logprobs(model, prompt_ids: jax.Array, prompt_mask: jax.Array,
                      response_ids: jax.Array, response_mask: jax.Array,
                      pixel_values: jax.Array | None = None,
                      image_grid_thw: jax.Array | None = None, *,
                      temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      with_entropy: bool = True,
                      max_frame_patches: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced log-probs of each response token given its (left-padded) prompt.

  Args:
    model: a Qwen2.5-VL module (merged inside jit).
    prompt_ids: [B, Tp] left-padded prompts.
    prompt_mask: [B, Tp] 1 for real prompt tokens.
    response_ids: [B, N] responses, padding after EOS.
    response_mask: [B, N] 1 for response tokens up to and including EOS.
    pixel_values: [Np, C*T*P*P] patches of the images of all B rows, row-major, or None.
    image_grid_thw: [I, 3] or None.
    temperature: the sampling temperature.
    chunk_size: response positions projected to the vocabulary at once.
    with_entropy: also return the policy's per-token entropy.

  Returns:
    logp [B, N] float32: log softmax(logits / temperature)[response token]; padding
      positions hold finite but meaningless values (mask them).
    entropy [B, N] float32 (zeros when with_entropy is False).
  """
  _check_settings(chunk_size, temperature)
  if prompt_ids.ndim != 2 or response_ids.ndim != 2:
    raise ValueError(f"prompt_ids and response_ids must be [B, T], got {prompt_ids.shape} "
                     f"and {response_ids.shape}")
  if prompt_ids.shape[0] != response_ids.shape[0]:
    raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows but response_ids has "
                     f"{response_ids.shape[0]}")
  prompt_len = prompt_ids.shape[1]
  response_len = response_ids.shape[1]
  config = model.config
  placeholders = jnp.asarray([config.image_token_id, config.video_token_id])
  response_inputs = jnp.where(jnp.isin(response_ids, placeholders),
                              VISION_PLACEHOLDER_REPLACEMENT, response_ids)
  input_ids = jnp.concatenate([prompt_ids, response_inputs.astype(prompt_ids.dtype)], axis=1)
  attention_mask = jnp.concatenate(
      [prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1)
  out = model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
              image_grid_thw=image_grid_thw, return_hidden=True,
              max_frame_patches=max_frame_patches)
  # Position Tp - 1 + t (the last prompt token, then each response token) predicts
  # response token t.
  hidden = jax.lax.dynamic_slice_in_dim(out.hidden_states, prompt_len - 1, response_len,
                                        axis=1)
  return logprobs_from_hidden(model.logits, hidden, response_ids, temperature=temperature,
                              chunk_size=chunk_size, with_entropy=with_entropy)
