"""Train LoRA on the top k decoder blocks over cached outputs of the frozen lower blocks.

With LoRA only on blocks ``split..N-1`` (and lm_head: `annotator.answer_head`), blocks ``0..split-1`` are
the frozen base model, so their output for a pair never changes during training. It is computed
once per pair (`build_layer_cache`) and stored, token by token, as float16 rows of width
``hidden_size``; a pair of T pair-part tokens costs ``T * hidden_size * 2`` bytes (SmolLM2-135M:
1,152 bytes a token). Gemma 3's states outgrow float16 (up to about 2e4 at its block 14 on pair tokens,
1e5 at <bos>; float16 stops at 65,504), so its rows hold bfloat16 bits instead (`cache_dtype_for`).
Each training step then runs only the top blocks, the final norm and the LM head at the answer position.

The prompt is ``prefix + pair part``. The prefix is shared: its lower-block keys/values and its
hidden state at ``split`` are computed once (`PrefixStates`); its upper-block keys/values depend
on the adapter, so they are recomputed once per step (with gradients) and shared by the batch.

Pair parts are right-padded after the prefix, at positions ``P .. P+T-1``, with a causal mask
that hides padding. A real token never attends to padding, so its hidden states equal those of
the unpadded prompt: the cache stores exactly what a full forward of the prompt computes.

Attention (`grouped_sdpa_attention`) reads the grouped key/value heads in place: transformers' own SDPA
path copies each of them once per query head it serves whenever there is a mask. Caching 64 Home Depot
pairs (37 tokens each, a 480-token prefix), attention took 87 ms a block that way and 33 ms this way,
against about 100 ms for the block's weights.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

KV = tuple[torch.Tensor, torch.Tensor]
CACHE_DTYPE = np.float16
BFLOAT16_BITS = np.dtype(np.uint16)  # rows of this dtype hold bfloat16 bit patterns (numpy has no bfloat16)
WIDE_RANGE_MODELS = ("gemma",)  # model_type prefixes whose hidden states overflow float16
READY_FILE = "ready.json"
GROUPED_SDPA_ATTENTION = "mnr_grouped_sdpa"  # the name `run_blocks` registers with transformers' AttentionInterface


# -- running a range of blocks ----------------------------------------------------------------------
class _PrefixKV:
    """Duck-typed KV cache for the decoder layers: puts each layer's prefix keys/values (expanded to
    the batch) before the new ones, and records the new ones (the prefix recompute needs them)."""

    def __init__(self, prefix: dict[int, KV], batch: int):
        self.prefix = prefix
        self.batch = batch
        self.new: dict[int, KV] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_: Any, **__: Any) -> KV:
        self.new[layer_idx] = (keys, values)
        if layer_idx not in self.prefix:
            return keys, values
        old_k, old_v = self.prefix[layer_idx]
        return (torch.cat([old_k.expand(self.batch, -1, -1, -1).to(keys.dtype), keys], dim=2),
                torch.cat([old_v.expand(self.batch, -1, -1, -1).to(values.dtype), values], dim=2))


def attention_mask(prefix_len: int, lengths: Sequence[int], width: int, window: int | None = None) -> torch.Tensor:
    """(B, 1, W, P+W) boolean mask (True: attended): every token sees the prefix and the real tokens up to itself;
    with a sliding ``window``, only the keys less than ``window`` positions behind it (Gemma 3's local layers)."""
    lengths_t = torch.as_tensor(list(lengths))
    query = torch.arange(width)
    key = torch.arange(width)
    causal = key[None, :] <= query[:, None]
    real_key = key[None, :] < lengths_t[:, None]
    allowed = torch.cat([torch.ones(len(lengths), width, prefix_len, dtype=torch.bool),
                         causal[None] & real_key[:, None, :]], dim=2)
    if window is not None:
        query_at = torch.arange(prefix_len, prefix_len + width)
        key_at = torch.arange(prefix_len + width)
        in_window = (query_at[:, None] - key_at[None, :] < window)[None]
        # padding rows keep every key: a row that sees none would softmax to NaN and spread it
        padding_query = (query[None, :] >= lengths_t[:, None])[:, :, None]
        allowed &= in_window | padding_query
    return allowed[:, None]


def grouped_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                           **_: Any) -> tuple[torch.Tensor, None]:
    """SDPA with grouped key/value heads read in place (``enable_gqa``), under a mask.

    ``query`` (B, H, W, d); ``key``, ``value`` (B, G, P+W, d), G key/value heads each serving H/G query heads;
    ``attention_mask`` (B, 1, W, P+W) boolean. Returns (B, W, H, d), as transformers' attention functions do.
    transformers' own SDPA path copies every key/value head H/G times whenever there is a mask. No dropout: the
    frozen blocks have none, and LoRA's sits in its own layers.
    """
    if torch.is_grad_enabled() and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32:
        return _explicit_attention(query, key, value, attention_mask, scaling), None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                        scaling: float) -> torch.Tensor:
    """`grouped_sdpa_attention` as matmuls and a softmax in the scores' dtype, for training in bfloat16. The CPU
    flash kernel's backward in bfloat16 ran 4.5x slower than this (a batch of 32 pairs over a 480-token prefix:
    74 ms against 17 ms a block), and a float32 softmax 2.4x slower than one in bfloat16. Each key/value head
    takes its query heads as one longer sequence, so nothing is copied."""
    batch, heads, width, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, group * width, dim) * scaling, key.transpose(-1, -2))
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill_(~mask, float("-inf"))
        scores = scores + bias.expand(batch, group, width, length).reshape(batch, 1, group * width, length)
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (B, G, group*W, d)
    return out.reshape(batch, heads, width, dim).transpose(1, 2).contiguous()


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_SDPA_ATTENTION, grouped_sdpa_attention)


def decoder_of(model: Any) -> Any:
    """The ``LlamaModel``-like stack (``layers``, ``rotary_emb``, ``norm``) of a causal LM or PEFT model."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model


def lm_head_of(model: Any) -> Any:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.lm_head


def run_blocks(model: Any, blocks: range, hidden: torch.Tensor, *, prefix_kv: dict[int, KV], prefix_len: int,
               lengths: Sequence[int]) -> tuple[torch.Tensor, dict[int, KV]]:
    """Run decoder ``blocks`` on right-padded ``hidden`` (B, W, H) placed after a prefix of ``prefix_len``.

    Returns the output hidden states (B, W, H) and each block's new keys/values.
    """
    decoder = decoder_of(model)
    batch, width, _ = hidden.shape
    positions = torch.arange(prefix_len, prefix_len + width).unsqueeze(0).expand(batch, -1)
    config = decoder.config
    layer_types = _layer_types(config)
    rotary = _rotary_by_type(decoder, hidden, positions, layer_types)
    window = getattr(config, "sliding_window", None)
    masks = {kind: attention_mask(prefix_len, lengths, width, window=window if kind == "sliding_attention" else None)
             for kind in set(layer_types)}
    cache = _PrefixKV(prefix_kv, batch)
    # the model's attention function is swapped for these blocks and put back after: no other thread may run
    # the same model meanwhile (fine-tuning runs one)
    _register_attention()
    chosen = config._attn_implementation
    config._attn_implementation = GROUPED_SDPA_ATTENTION
    try:
        for index in blocks:
            kind = layer_types[index]
            hidden = decoder.layers[index](hidden, attention_mask=masks[kind], position_ids=positions,
                                           past_key_values=cache, use_cache=True, position_embeddings=rotary[kind])
    finally:
        config._attn_implementation = chosen
    return hidden, cache.new


def _layer_types(config: Any) -> list[str]:
    """Each block's attention kind as the config declares it (Gemma 3 interleaves five "sliding_attention"
    blocks to one "full_attention" one), or "full_attention" for every block."""
    declared = getattr(config, "layer_types", None)
    return list(declared) if declared else ["full_attention"] * config.num_hidden_layers


def _rotary_by_type(decoder: Any, hidden: torch.Tensor, positions: torch.Tensor,
                    layer_types: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rotary (cos, sin) per attention kind: Gemma 3's local and global blocks rotate at different bases."""
    kinds = set(layer_types)
    if not hasattr(decoder.rotary_emb, "layer_types"):
        return {kind: decoder.rotary_emb(hidden, positions) for kind in kinds}
    return {kind: decoder.rotary_emb(hidden, positions, kind) for kind in kinds}


@dataclass
class PrefixStates:
    """The shared prefix through the frozen blocks: its keys/values there and its hidden state at ``split``."""

    split: int
    length: int
    lower_kv: dict[int, KV]
    hidden: torch.Tensor  # (1, P, H) float32


@torch.no_grad()
def prefix_states(model: Any, prefix: Sequence[int], split: int) -> PrefixStates:
    decoder = decoder_of(model)
    if not prefix:
        empty = torch.zeros(1, 0, decoder.config.hidden_size)
        return PrefixStates(split, 0, {}, empty)
    hidden = decoder.embed_tokens(torch.tensor([list(prefix)]))
    hidden, kv = run_blocks(model, range(split), hidden, prefix_kv={}, prefix_len=0, lengths=[len(prefix)])
    return PrefixStates(split, len(prefix), kv, hidden)


def upper_prefix_kv(model: Any, prefix: PrefixStates) -> dict[int, KV]:
    """The prefix's keys/values in the trainable blocks, under the current adapter (with gradients)."""
    if prefix.length == 0:
        return {}
    n_layers = len(decoder_of(model).layers)
    _, kv = run_blocks(model, range(prefix.split, n_layers), prefix.hidden, prefix_kv=prefix.lower_kv,
                       prefix_len=0, lengths=[prefix.length])
    return kv


def top_block_logits(model: Any, prefix: PrefixStates, hidden: torch.Tensor, lengths: Sequence[int],
                     at: np.ndarray | None = None) -> torch.Tensor:
    """(B, vocab) answer-position logits from cached lower-block states ``hidden`` (B, W, H); with ``at``
    (B, P) positions in each pair part, (B, P, vocab) logits there (a flag prompt is read at its grade
    answer and at its end)."""
    states = top_block_states(model, prefix, hidden, lengths, at)
    with torch.autocast("cpu", enabled=False):  # the answer logits in float32 whatever the blocks ran in
        return lm_head_of(model)(states)


def top_block_states(model: Any, prefix: PrefixStates, hidden: torch.Tensor, lengths: Sequence[int],
                     at: np.ndarray | None = None) -> torch.Tensor:
    """The final normed hidden states that `top_block_logits` reads, in float32: (B, H), or (B, P, H) at ``at``."""
    n_layers = len(decoder_of(model).layers)
    kv = {**prefix.lower_kv, **upper_prefix_kv(model, prefix)}
    out, _ = run_blocks(model, range(prefix.split, n_layers), hidden, prefix_kv=kv, prefix_len=prefix.length,
                        lengths=lengths)
    if at is None:
        picked = out[torch.arange(len(lengths)), torch.as_tensor(list(lengths)) - 1]
    else:
        picked = out[torch.arange(len(lengths))[:, None], torch.as_tensor(np.asarray(at), dtype=torch.long)]
    with torch.autocast("cpu", enabled=False):
        return decoder_of(model).norm(picked.float())


# -- the cache --------------------------------------------------------------------------------------
@dataclass
class LayerCache:
    """Lower-block outputs of pairs, flat: pair i is rows ``offsets[i]:offsets[i]+lengths[i]`` of ``rows``.

    ``rows`` is (total tokens, H) float16 (or bfloat16 bits: `cache_dtype_for`), in memory or a ``np.memmap``
    on disk; ``filled`` pairs (the first ones in ``order``) are computed so far, in ``fill_seconds``.
    """

    rows: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    filled: int = 0
    fill_seconds: float = 0.0  # spent computing the filled pairs (by `fill_cache`, this process)

    @property
    def nbytes(self) -> int:
        return int(self.lengths[: self.filled].sum()) * self.rows.shape[1] * self.rows.itemsize

    def batch(self, indices: Sequence[int], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[int]]:
        """(B, W, H) right-padded states of pairs ``indices`` and their lengths."""
        lengths = [int(self.lengths[i]) for i in indices]
        out = torch.zeros(len(indices), max(lengths), self.rows.shape[1], dtype=dtype)
        for b, (i, n) in enumerate(zip(indices, lengths)):
            start = int(self.offsets[i])
            out[b, :n] = _from_rows(self.rows[start: start + n])
        return out, lengths

    def store(self, start: int, states: np.ndarray) -> None:
        """Write float32 ``states`` (T, H) at row ``start``, in the rows' dtype."""
        self.rows[start: start + len(states)] = _to_rows(states, self.rows.dtype)


def cache_dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == BFLOAT16_BITS else str(dtype)


def cache_dtype_for(model: Any) -> np.dtype:
    """float16 rows, or bfloat16 bits for a model whose hidden states outgrow float16 (Gemma)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = str(getattr(causal_lm.config, "model_type", ""))
    return BFLOAT16_BITS if model_type.startswith(WIDE_RANGE_MODELS) else np.dtype(CACHE_DTYPE)


def _to_rows(states: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == BFLOAT16_BITS:
        return torch.from_numpy(np.ascontiguousarray(states)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return states.astype(dtype, copy=False)


def _from_rows(rows: np.ndarray) -> torch.Tensor:
    if rows.dtype == BFLOAT16_BITS:
        return torch.from_numpy(np.array(rows).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(rows, dtype=np.float32))


def allocate_cache(lengths: Sequence[int], hidden_size: int, *, max_resident_bytes: int, spill_dir: Path | None,
                   dtype: Any = CACHE_DTYPE) -> LayerCache:
    """Room for every pair: in memory up to ``max_resident_bytes``, else a memmap file in ``spill_dir``."""
    lengths_a = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_a)[:-1]]).astype(np.int64)
    shape = (int(lengths_a.sum()), hidden_size)
    if np.prod(shape) * np.dtype(dtype).itemsize <= max_resident_bytes or spill_dir is None:
        rows = np.empty(shape, dtype=dtype)
    else:
        spill_dir.mkdir(parents=True, exist_ok=True)
        (spill_dir / READY_FILE).unlink(missing_ok=True)
        rows = np.lib.format.open_memmap(spill_dir / "rows.npy", mode="w+", dtype=dtype, shape=shape)
    return LayerCache(rows, offsets, lengths_a)


def reuse_spilled(spill_dir: Path | None, key: str, lengths: Sequence[int]) -> LayerCache | None:
    """A spilled cache left by an interrupted run with the same ``key`` (data, model, split, prompts)."""
    if spill_dir is None or not (spill_dir / READY_FILE).is_file():
        return None
    ready = json.loads((spill_dir / READY_FILE).read_text())
    if ready.get("key") != key:
        return None
    rows = np.load(spill_dir / "rows.npy", mmap_mode="r")
    lengths_a = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_a)[:-1]]).astype(np.int64)
    return LayerCache(rows, offsets, lengths_a, filled=int(ready["filled"]))


def mark_ready(spill_dir: Path, key: str, filled: int) -> None:
    (spill_dir / READY_FILE).write_text(json.dumps({"key": key, "filled": filled}))


@torch.no_grad()
def fill_cache(model: Any, prefix: PrefixStates, suffixes: Sequence[Sequence[int]], cache: LayerCache, *,
               order: Sequence[int], batch_size: int, deadline: float = float("inf"),
               stop_after: int | None = None, at_least: int = 1) -> int:
    """Compute the lower-block states of pairs in ``order`` (``suffixes`` indexes match ``cache``).

    Pairs are taken in ``order`` in groups of at most ``batch_size``, each group sorted by length to
    cut padding, until all are done, ``stop_after`` are done, or the next group would end past
    ``deadline`` (``time.monotonic()``), judged by this call's pace so far, with at least ``at_least``
    done. Groups are cut so that the ``at_least`` pairs cost no more than they must; with a deadline,
    the first group past them is a small probe of the pace. ``cache.fill_seconds`` adds up the time.
    Returns the number of pairs of ``order`` done (a prefix of it); ``cache.filled`` is set to it.
    """
    decoder = decoder_of(model)
    if cache.rows.dtype == np.float16 and cache_dtype_for(model) == BFLOAT16_BITS:
        raise ValueError("float16 cache rows for a model whose states outgrow float16: allocate the cache with "
                         "dtype=cache_dtype_for(model) (bfloat16 bits)")
    limit = len(order) if stop_after is None else min(stop_after, len(order))
    done = start_done = cache.filled
    seconds = 0.0
    while True:
        pace = seconds / (done - start_done) if done > start_done else None
        size = _group_size(done=done, limit=limit, batch_size=batch_size, at_least=at_least, deadline=deadline,
                           pace=pace)
        if size <= 0:
            break
        tick = time.monotonic()
        group = sorted(order[done: done + size], key=lambda i: len(suffixes[i]))
        lengths = [len(suffixes[i]) for i in group]
        ids = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for b, i in enumerate(group):
            ids[b, : lengths[b]] = torch.tensor(list(suffixes[i]))
        hidden, _ = run_blocks(model, range(prefix.split), decoder.embed_tokens(ids), prefix_kv=prefix.lower_kv,
                               prefix_len=prefix.length, lengths=lengths)
        states = hidden.float().numpy()
        for b, i in enumerate(group):
            cache.store(int(cache.offsets[i]), states[b, : lengths[b]])
        done += len(group)
        cache.filled = done
        seconds += time.monotonic() - tick
    cache.fill_seconds += seconds
    return done


PROBE_GROUP = 8  # pairs in the first group that measures the caching pace against a deadline


def _group_size(*, done: int, limit: int, batch_size: int, at_least: int, deadline: float,
                pace: float | None) -> int:
    """Pairs in the next `fill_cache` group (0: stop): what is owed first, then what fits before ``deadline``."""
    room = min(batch_size, limit - done)
    if done < at_least:
        return min(room, at_least - done)
    if math.isinf(deadline):
        return room
    left = deadline - time.monotonic()
    if pace is None:
        return min(room, PROBE_GROUP) if left > 0 else 0
    return max(0, min(room, int(left / max(pace, 1e-9))))


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, *, pool: int = 8,
                            granularity: int = 8):
    """Endless mini-batches, epoch after epoch: each epoch shuffles, groups pools of ``pool`` batches by
    length, then shuffles the batches. Yields (epoch, indices).

    Lengths are grouped in steps of ``granularity`` tokens, in random order within a step: length
    can go with the label (short titles, say), and batches sorted by exact length would then be
    nearly one label each.
    """
    n = len(lengths)
    size = min(batch_size, n)
    epoch = 0
    while True:
        order = rng.permutation(n)
        batches = []
        for start in range(0, n, size * pool):
            chunk = order[start: start + size * pool]
            chunk = chunk[np.lexsort((rng.random(len(chunk)), lengths[chunk] // granularity))]
            batches.extend(chunk[i: i + size] for i in range(0, len(chunk), size))
        for b in rng.permutation(len(batches)):
            yield epoch, batches[b]
        epoch += 1
