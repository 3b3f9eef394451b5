"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) as pure functions over a param pytree.

Parameters (L layers stacked on the leading axis, G = query heads per KV head):
    embed [V, D]; final_norm [D]; lm_head [D, V] (absent when tied to embed)
    layers/attn_norm [L, D]; layers/wqkv [L, D, Hkv, G+2, hd] (G query heads, then k, then v);
    layers/bqkv [L, Hkv, G+2, hd] (qkv bias); layers/q_norm, k_norm [L, hd] (Qwen3);
    layers/wo [L, Hkv, G, hd, D]; layers/bo [L, D]; layers/mlp_norm [L, D];
    layers/w_gate_up [L, D, 2, F]; layers/w_down [L, F, D]
Grouping q with its KV head keeps one KV head's whole attention on one tensor-parallel shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm import ops
from jaxllm.config import ModelConfig, rope_inv_freq
from jaxllm.kv_cache import AttentionMeta, KVCache

Params = dict


def param_axes(config: ModelConfig) -> dict:
    """Logical axis names of every parameter, mirroring the param pytree."""
    layers = {
        "attn_norm": ("layers", "embed"),
        "wqkv": ("layers", "embed", "kv_heads", None, "head_dim"),
        "wo": ("layers", "kv_heads", None, "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate_up": ("layers", "embed", None, "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layers["bqkv"] = ("layers", "kv_heads", None, "head_dim")
    if config.o_bias:
        layers["bo"] = ("layers", "embed")
    if config.qk_norm:
        layers["q_norm"] = ("layers", "head_dim")
        layers["k_norm"] = ("layers", "head_dim")
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("embed",)}
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


# Input (contracted) axes of each matrix, not counting the layer axis: weight quantization keeps
# one scale per output channel, so these are the axes a scale spans.
INPUT_AXES = {"wqkv": (0,), "wo": (0, 1, 2), "w_gate_up": (0,), "w_down": (0,), "lm_head": (0,)}


def param_shapes(config: ModelConfig) -> dict:
    """Shape of every parameter, mirroring the param pytree."""
    c = config
    L, D, F, hd, Hkv, G = c.num_layers, c.hidden_size, c.intermediate_size, c.head_dim, c.num_kv_heads, c.q_per_kv
    layers = {
        "attn_norm": (L, D),
        "wqkv": (L, D, Hkv, G + 2, hd),
        "wo": (L, Hkv, G, hd, D),
        "mlp_norm": (L, D),
        "w_gate_up": (L, D, 2, F),
        "w_down": (L, F, D),
        "bqkv": (L, Hkv, G + 2, hd),
        "bo": (L, D),
        "q_norm": (L, hd),
        "k_norm": (L, hd),
    }
    axes = param_axes(config)
    shapes = {"embed": (c.vocab_size, D), "final_norm": (D,), "lm_head": (D, c.vocab_size)}
    shapes = {k: v for k, v in shapes.items() if k in axes}
    shapes["layers"] = {k: v for k, v in layers.items() if k in axes["layers"]}
    return shapes


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"], eps: float) -> Float[Array, "... D"]:
    """x / rms(x) * weight, the statistics in float32 (as transformers computes them)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def normed_einsum(subscripts: str, x: Float[Array, "B T D"], norm_weight: Float[Array, "D"], w, eps: float):
    """RMSNorm(x) contracted with the weight `w`, computed as ((x * g) w) / rms(x).

    1 / rms(x) is one number per token, so it can follow the product: XLA then folds the norm into
    the matmul's neighbours, two kernels fewer per norm at decode (benchmarks/NOTES.md). float16
    keeps the textbook order (un-normalised products could overflow it), and so does calibration,
    whose statistics are of the normalised activations.
    """
    if x.dtype == jnp.float16 or ops.observing():
        return ops.einsum(subscripts, rms_norm(x, norm_weight, eps), w)
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + eps)  # [B, T]
    out = ops.einsum(subscripts, norm_weight.astype(x.dtype) * x, w)
    inv_rms = inv_rms.reshape(inv_rms.shape + (1,) * (out.ndim - inv_rms.ndim))
    return (out.astype(jnp.float32) * inv_rms).astype(out.dtype)


def rope(x: Float[Array, "B T ... hd"], positions: Int[Array, "B T"], inv_freq: Float[Array, "hd/2"]):
    """Rotary embedding, halves layout: x*cos + rotate_half(x)*sin."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    extra = (None,) * (x.ndim - 3)
    cos = jnp.cos(angles)[:, :, *extra].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, *extra].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_block(layer: Params, x, cache: KVCache | None, index, window, meta: AttentionMeta,
                    config: ModelConfig, inv_freq):
    """Self-attention of one layer over RMSNorm(x): writes this step's K/V into the pages and attends
    over them, or, with no cache, attends causally within `x` (training, scoring). A token tree
    (meta.tree_mask set) attends over the pages and its own K/V without storing them: those come
    back as the third value, (k, v), for the caller to store what it keeps (None otherwise)."""
    G = config.q_per_kv
    qkv = normed_einsum("btd,dhgk->bthgk", x, layer["attn_norm"], layer["wqkv"], config.rms_norm_eps)
    if "bqkv" in layer:
        qkv = qkv + layer["bqkv"].astype(qkv.dtype)
    q, k, v = qkv[..., :G, :], qkv[..., G, :], qkv[..., G + 1, :]
    if "q_norm" in layer:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    q = rope(q, meta.positions, inv_freq)
    k = rope(k, meta.positions, inv_freq)
    scale = config.head_dim**-0.5
    tree_kv = None
    if cache is None:
        out = ops.causal_attention(q, k, v, meta.positions, window, scale=scale,
                                   backend=config.attention_backend)
    elif meta.tree_mask is not None:
        out = ops.paged_tree_attention(q, k, v, cache, index, meta.page_table, meta.positions, meta.tree_start,
                                       meta.tree_mask, window, scale=scale, backend=config.attention_backend)
        tree_kv = (k, v)
    else:
        out, cache = ops.store_and_attend(q, k, v, cache, index, meta.page_table, meta.positions, meta.kv_lens,
                                          window, scale=scale, backend=config.attention_backend)
    out = ops.einsum("bthgk,hgkd->btd", out, layer["wo"])
    if "bo" in layer:
        out = out + layer["bo"].astype(out.dtype)
    return out, cache, tree_kv


def mlp_block(layer: Params, x, eps: float):
    """SwiGLU over RMSNorm(x): down(silu(gate x) * up x)."""
    gate_up = normed_einsum("btd,dcf->btcf", x, layer["mlp_norm"], layer["w_gate_up"], eps)
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return ops.einsum("btf,fd->btd", hidden, layer["w_down"])


def forward_hidden(
    params: Params,
    tokens: Int[Array, "B T"],
    meta: AttentionMeta,
    cache: KVCache | None,
    config: ModelConfig,
) -> tuple[Float[Array, "B T D"], KVCache | None]:
    """Runs the decoder over `tokens`, caching their K/V; returns final-normed hidden states.

    With `cache=None` the tokens attend only to each other (meta's page table and kv_lens unused).
    Layers stacked on a leading axis run under `lax.scan`; a list of per-layer dicts (see
    `unstack_layers`) runs unrolled, each matmul reading its own weight buffer.
    """
    if meta.tree_mask is not None:
        raise ValueError("a token tree (meta.tree_mask set) runs through forward_tree, which returns its K/V")
    hidden, cache, _ = _decoder(params, tokens, meta, cache, config)
    return hidden, cache


def forward_tree(
    params: Params,
    tokens: Int[Array, "B T"],
    meta: AttentionMeta,
    cache: KVCache,
    config: ModelConfig,
) -> tuple[Float[Array, "B T D"], Float[Array, "L B T Hkv D"], Float[Array, "L B T Hkv D"]]:
    """Runs the decoder over a token tree (meta.tree_start and meta.tree_mask set) against the cached
    prefix, storing nothing; returns final-normed hidden states and every layer's K and V of the
    tree's tokens, so that only the accepted ones need storing (`jaxllm.ops.store_kv_layers`)."""
    if meta.tree_mask is None or meta.tree_start is None or cache is None:
        raise ValueError("forward_tree needs a cache and meta.tree_start / meta.tree_mask")
    hidden, _, (k, v) = _decoder(params, tokens, meta, cache, config)
    return hidden, k, v


def _decoder(params: Params, tokens, meta: AttentionMeta, cache: KVCache | None, config: ModelConfig):
    """(final-normed hidden states, cache, per-layer (k, v) stacked [L, ...] for a tree, else None)."""
    inv_freq = jnp.asarray(rope_inv_freq(config.rope, config.head_dim))
    x = params["embed"][tokens]
    windows = jnp.asarray(np.array(config.sliding_windows, np.int32))

    def layer_step(carry, xs):
        x, cache = carry
        layer, index, window = xs
        h, cache, tree_kv = attention_block(layer, x, cache, index, window, meta, config, inv_freq)
        x = x + h
        x = x + mlp_block(layer, x, config.rms_norm_eps)
        return (x, cache), tree_kv

    if isinstance(params["layers"], (list, tuple)):
        per_layer = []
        for i, layer in enumerate(params["layers"]):
            (x, cache), tree_kv = layer_step((x, cache), (layer, i, config.sliding_windows[i]))
            per_layer.append(tree_kv)
        tree_kv = None if per_layer[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    else:
        (x, cache), tree_kv = jax.lax.scan(
            layer_step, (x, cache), (params["layers"], jnp.arange(config.num_layers), windows)
        )
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), cache, tree_kv


def unstack_layers(params: Params) -> Params:
    """The same params with `layers` as a list of per-layer dicts (for the unrolled forward)."""
    layers = params["layers"]
    num_layers = len(next(iter(layers.values())))
    return {**params, "layers": [{k: v[i] for k, v in layers.items()} for i in range(num_layers)]}


def logits(params: Params, hidden: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """Output projection (the tied embedding when there is no lm_head), in float32."""
    if "lm_head" in params:
        out = ops.einsum("...d,dv->...v", hidden, params["lm_head"])
    else:
        out = ops.einsum("...d,vd->...v", hidden, params["embed"])
    return out.astype(jnp.float32)
