"""Mapping between Hugging Face Llama-family tensors and the param pytree of models/llama.py."""

from __future__ import annotations

import numpy as np

from jaxllm.config import ModelConfig


def hf_global_names(config: ModelConfig) -> dict[str, str]:
    """Our top-level param name -> HF tensor name."""
    names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head"] = "lm_head.weight"
    return names


def hf_layer_names(config: ModelConfig, i: int) -> list[str]:
    """HF tensor names of layer i."""
    p = f"model.layers.{i}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
    names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if config.qkv_bias:
        names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    if config.o_bias:
        names.append(p + "self_attn.o_proj.bias")
    if config.qk_norm:
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the model needs, for validation before conversion."""
    c = config
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D),
        "self_attn.v_proj.weight": (kv, D), "self_attn.o_proj.weight": (D, q),
        "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (D,),
        "self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,),
    }
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(c.num_layers):
        for name in hf_layer_names(c, i):
            shapes[name] = per_layer[name.split(f"layers.{i}.", 1)[1]]
    return shapes


def convert_global(config: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = hf_global_names(config)
    out = {ours: tensors[hf] for ours, hf in names.items()}
    if "lm_head" in out:
        out["lm_head"] = out["lm_head"].T
    return out


def convert_layer(config: ModelConfig, i: int, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's HF tensors -> our fused, transposed layout (see models/llama.py)."""
    c = config
    p = f"model.layers.{i}."
    Hkv, G, hd, D = c.num_kv_heads, c.q_per_kv, c.head_dim, c.hidden_size

    def heads(name, groups):  # [groups*Hkv*hd, ...] -> [Hkv, groups, hd, ...]
        x = t[p + name]
        return x.reshape(Hkv, groups, hd, *x.shape[1:])

    qkv = np.concatenate([heads("self_attn.q_proj.weight", G), heads("self_attn.k_proj.weight", 1),
                          heads("self_attn.v_proj.weight", 1)], axis=1)
    gate_up = np.stack([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
    out = {
        "attn_norm": t[p + "input_layernorm.weight"],
        "wqkv": qkv.transpose(3, 0, 1, 2),
        "wo": t[p + "self_attn.o_proj.weight"].reshape(D, Hkv, G, hd).transpose(1, 2, 3, 0),
        "mlp_norm": t[p + "post_attention_layernorm.weight"],
        "w_gate_up": gate_up.transpose(2, 0, 1),
        "w_down": t[p + "mlp.down_proj.weight"].T,
    }
    if c.qkv_bias:
        out["bqkv"] = np.concatenate([heads("self_attn.q_proj.bias", G), heads("self_attn.k_proj.bias", 1),
                                      heads("self_attn.v_proj.bias", 1)], axis=1)
    if c.o_bias:
        out["bo"] = t[p + "self_attn.o_proj.bias"]
    if c.qk_norm:
        out["q_norm"] = t[p + "self_attn.q_norm.weight"]
        out["k_norm"] = t[p + "self_attn.k_norm.weight"]
    return out


def to_hf(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our param pytree (host arrays) -> HF tensors: the inverse of convert_global/convert_layer."""
    c = config
    Hkv, G, hd, D = c.num_kv_heads, c.q_per_kv, c.head_dim, c.hidden_size
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if "lm_head" in params:
        out["lm_head.weight"] = params["lm_head"].T
    layers = params["layers"]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        qkv = layers["wqkv"][i].transpose(1, 2, 3, 0)  # [Hkv, G+2, hd, D]
        out[p + "input_layernorm.weight"] = layers["attn_norm"][i]
        out[p + "post_attention_layernorm.weight"] = layers["mlp_norm"][i]
        out[p + "self_attn.q_proj.weight"] = qkv[:, :G].reshape(Hkv * G * hd, D)
        out[p + "self_attn.k_proj.weight"] = qkv[:, G].reshape(Hkv * hd, D)
        out[p + "self_attn.v_proj.weight"] = qkv[:, G + 1].reshape(Hkv * hd, D)
        out[p + "self_attn.o_proj.weight"] = layers["wo"][i].transpose(3, 0, 1, 2).reshape(D, Hkv * G * hd)
        gate_up = layers["w_gate_up"][i].transpose(1, 2, 0)  # [2, F, D]
        out[p + "mlp.gate_proj.weight"] = gate_up[0]
        out[p + "mlp.up_proj.weight"] = gate_up[1]
        out[p + "mlp.down_proj.weight"] = layers["w_down"][i].T
        if c.qkv_bias:
            b = layers["bqkv"][i]
            out[p + "self_attn.q_proj.bias"] = b[:, :G].reshape(-1)
            out[p + "self_attn.k_proj.bias"] = b[:, G].reshape(-1)
            out[p + "self_attn.v_proj.bias"] = b[:, G + 1].reshape(-1)
        if c.o_bias:
            out[p + "self_attn.o_proj.bias"] = layers["bo"][i]
        if c.qk_norm:
            out[p + "self_attn.q_norm.weight"] = layers["q_norm"][i]
            out[p + "self_attn.k_norm.weight"] = layers["k_norm"][i]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
