"""Tiny random Hugging Face checkpoints (config, safetensors weights, tokenizer) for tests and docs.

Needs numpy, safetensors, tokenizers and transformers' config classes only; torch is not required.

Init: matrix entries are N(0, s^2) with s = init_std * sqrt(64 / fan_in) (the embedding and lm_head
get twice that), norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1). With the defaults a 2-layer model
gives clearly peaked next-token distributions (median max probability around 0.5).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import json
import math
import os
import pathlib
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy
import tokenizers
import transformers
from jaxtyping import Float

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# Role markers are plain text (encoded as ordinary BPE tokens); each turn ends with eos so that a
# model following the template stops on eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_NUM_MERGES = 64
# Fixed corpus the BPE merges are learned from; changing it changes every token id above 255.
_MERGE_CORPUS = '''\
def greet(name: str) -> str:
    """Return a greeting for name."""
    return f"Hello, {name}!"


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value


for index in range(10):
    if index % 2 == 0:
        print("even", index)
    else:
        print("odd", index)

The quick brown fox jumps over the lazy dog. The model reads the prompt and then it writes the
answer one token at a time, and the runtime returns the tokens to the user.
'''

_CONFIG_CLASSES = {
    "LlamaForCausalLM": transformers.LlamaConfig,
    "MistralForCausalLM": transformers.MistralConfig,
    "Qwen2ForCausalLM": transformers.Qwen2Config,
    "Qwen3ForCausalLM": transformers.Qwen3Config,
}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Matrix init is N(0, init_std^2) at this fan-in and scales as 1/sqrt(fan_in), so activations keep
# the same size at any width.
_REFERENCE_FAN_IN = 64
# Extra gain on the output projection so that next-token distributions are clearly peaked.
_LOGIT_GAIN = 2.0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over byte-level words; ties go to the lexicographically smallest pair."""
    counts = collections.Counter(tuple(word) for word in words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, freq in counts.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for symbols, freq in counts.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        counts = merged
    return merges


def _build_raw_tokenizer() -> tokenizers.Tokenizer:
    byte_chars = _bytes_to_unicode()
    alphabet = [byte_chars[b] for b in range(256)]
    assert set(alphabet) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [word for word, _ in pre_tokenizer.pre_tokenize_str(_MERGE_CORPUS)]
    merges = _learn_merges(words, _NUM_MERGES)
    vocab = {char: i for i, char in enumerate(alphabet)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [tokenizers.AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


_TOKENIZER_JSON: str | None = None


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer that write_tiny_checkpoint saves (a fresh object per call)."""
    global _TOKENIZER_JSON
    if _TOKENIZER_JSON is None:
        _TOKENIZER_JSON = _build_raw_tokenizer().to_str()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(_TOKENIZER_JSON),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _validate(
    architecture: str,
    dtype: str,
    num_shards: int,
    sizes: Mapping[str, int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None,
    hidden_size: int,
    rope_scaling: Mapping[str, Any] | None,
    sliding_window: int | None,
    init_std: float,
    config_overrides: Mapping[str, Any] | None,
) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture={architecture!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {SUPPORTED_DTYPES}")
    for name, value in {**sizes, "num_shards": num_shards}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
        )
    if head_dim is None and hidden_size % num_heads != 0:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by num_heads={num_heads} "
            "when head_dim is None"
        )
    if head_dim is not None and architecture == "Qwen2ForCausalLM" and head_dim * num_heads != hidden_size:
        raise ValueError(
            f"head_dim={head_dim} is not supported by Qwen2ForCausalLM, whose head_dim is "
            f"hidden_size // num_heads = {hidden_size // num_heads}"
        )
    if rope_scaling is not None and (
        not isinstance(rope_scaling, Mapping) or "rope_type" not in rope_scaling
    ):
        raise ValueError(
            f"rope_scaling={rope_scaling!r} must be None or a dict with a 'rope_type' key"
        )
    if sliding_window is not None:
        if architecture == "LlamaForCausalLM":
            raise ValueError(
                f"sliding_window={sliding_window!r} is not supported by LlamaForCausalLM; "
                "use MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM"
            )
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window!r} must be None or a positive int")
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"init_std={init_std!r} must be a positive finite float")
    if config_overrides is not None and not isinstance(config_overrides, Mapping):
        raise ValueError(f"config_overrides={config_overrides!r} must be None or a dict")


def _make_config(
    architecture: str,
    *,
    dtype: str,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    rope_theta: float,
    rope_scaling: Mapping[str, Any] | None,
    sliding_window: int | None,
    init_std: float,
    special_ids: Mapping[str, int],
    config_overrides: Mapping[str, Any] | None,
) -> transformers.PretrainedConfig:
    kwargs: dict[str, Any] = dict(
        architectures=[architecture],
        dtype=dtype,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta), **(rope_scaling or {})},
        initializer_range=float(init_std),
        **special_ids,
    )
    if architecture != "Qwen2ForCausalLM":
        kwargs["head_dim"] = head_dim if head_dim is not None else hidden_size // num_heads
    if architecture == "MistralForCausalLM":
        kwargs["sliding_window"] = sliding_window
    elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        # max_window_layers counts the leading full-attention layers: 0 makes every layer slide.
        kwargs.update(
            use_sliding_window=sliding_window is not None,
            sliding_window=sliding_window,
            max_window_layers=0 if sliding_window is not None else num_layers,
        )
    kwargs.update(config_overrides or {})
    try:
        return _CONFIG_CLASSES[architecture](**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid config for {architecture} (kwargs {kwargs!r}): {error}") from error


def _tensor_shapes(config: transformers.PretrainedConfig, architecture: str) -> dict[str, tuple[int, ...]]:
    """HF state-dict names and shapes for the config, in the order HF lists them."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // hq
    attn_bias = getattr(config, "attention_bias", False)
    qkv_bias = attn_bias or architecture == "Qwen2ForCausalLM"
    mlp_bias = getattr(config, "mlp_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hq * hd, d)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (hq * hd,)
        shapes[p + "self_attn.k_proj.weight"] = (hkv * hd, d)
        if qkv_bias:
            shapes[p + "self_attn.k_proj.bias"] = (hkv * hd,)
        shapes[p + "self_attn.v_proj.weight"] = (hkv * hd, d)
        if qkv_bias:
            shapes[p + "self_attn.v_proj.bias"] = (hkv * hd,)
        shapes[p + "self_attn.o_proj.weight"] = (d, hq * hd)
        if attn_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if architecture == "Qwen3ForCausalLM":
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            shapes[p + f"mlp.{proj}.weight"] = shape
            if mlp_bias:
                shapes[p + f"mlp.{proj}.bias"] = (shape[0],)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _init_tensor(name: str, shape: tuple[int, ...], seed: int, init_std: float) -> Float[np.ndarray, "..."]:
    """Deterministic float32 init from (seed, name), so one tensor does not depend on the others."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    fan_in = shape[1]
    std = init_std * math.sqrt(_REFERENCE_FAN_IN / fan_in)
    if name == "lm_head.weight" or name == "model.embed_tokens.weight":
        # The embedding doubles as the output projection when tied.
        std *= _LOGIT_GAIN
    return (std * noise).astype(np.float32)


def _split_into_shards(names: list[str], nbytes: Mapping[str, int], num_shards: int) -> list[list[str]]:
    """Contiguous groups of names with roughly equal byte totals, none empty."""
    cumulative = list(itertools.accumulate((nbytes[name] for name in names), initial=0))
    total = cumulative[-1]
    bounds = [0]
    for k in range(1, num_shards):
        start = bisect.bisect_left(cumulative, k * total / num_shards)
        start = min(max(start, bounds[-1] + 1), len(names) - (num_shards - k))
        bounds.append(start)
    bounds.append(len(names))
    return [names[bounds[k] : bounds[k + 1]] for k in range(num_shards)]


def _remove_old_weights(path: pathlib.Path) -> None:
    for old in [*path.glob("model-*-of-*.safetensors"), *path.glob("model.safetensors*")]:
        old.unlink()


def write_tiny_checkpoint(
    path: str | os.PathLike[str],
    architecture: str = "LlamaForCausalLM",
    *,
    dtype: str = "float32",
    seed: int = 0,
    num_shards: int = 1,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    sliding_window: int | None = None,
    init_std: float = 0.3,
    with_tokenizer: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write a random HF checkpoint for `architecture` into `path` (created if missing) and return it.

    Existing model*.safetensors files and the shard index in `path` are replaced. Weights come from
    `seed` alone, so equal arguments give byte-identical files. `config_overrides` are extra config
    kwargs applied last (weight shapes follow the resulting config).
    """
    sizes = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
    )
    if head_dim is not None:
        sizes["head_dim"] = head_dim
    _validate(
        architecture, dtype, num_shards, sizes, num_heads, num_kv_heads, head_dim, hidden_size,
        rope_scaling, sliding_window, init_std, config_overrides,
    )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    if not (isinstance(rope_theta, (int, float)) and math.isfinite(rope_theta) and rope_theta > 0):
        raise ValueError(f"rope_theta={rope_theta!r} must be a positive finite float")
    for name, flag in (("tie_word_embeddings", tie_word_embeddings), ("with_tokenizer", with_tokenizer)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r} must be a bool")
    out = pathlib.Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"path={str(out)!r} exists and is not a directory")

    tokenizer = byte_tokenizer()
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = _make_config(
        architecture, dtype=dtype, vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta, rope_scaling=rope_scaling,
        sliding_window=sliding_window, init_std=init_std, special_ids=special_ids,
        config_overrides=config_overrides,
    )
    if with_tokenizer and config.vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )

    shapes = _tensor_shapes(config, architecture)
    if num_shards > len(shapes):
        raise ValueError(f"num_shards={num_shards} exceeds the number of tensors ({len(shapes)})")
    np_dtype = _NP_DTYPES[dtype]
    tensors = {
        name: np.ascontiguousarray(_init_tensor(name, shape, seed, init_std).astype(np_dtype))
        for name, shape in shapes.items()
    }

    out.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(out)
    metadata = {"format": "pt"}
    if num_shards == 1:
        safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    else:
        nbytes = {name: t.nbytes for name, t in tensors.items()}
        groups = _split_into_shards(list(tensors), nbytes, num_shards)
        weight_map: dict[str, str] = {}
        for k, group in enumerate(groups, start=1):
            filename = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
            safetensors.numpy.save_file(
                {name: tensors[name] for name in group}, str(out / filename), metadata=metadata
            )
            weight_map.update({name: filename for name in group})
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config.save_pretrained(out)
    transformers.GenerationConfig(**special_ids).save_pretrained(out)
    if with_tokenizer:
        tokenizer.save_pretrained(out)
    return out


# -- 4-bit AWQ / GPTQ checkpoints in the exact Hugging Face layouts ----------------------------

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_INT4_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _pack_nibbles(values: np.ndarray, axis: int, order=tuple(range(8))) -> np.ndarray:
    """int32 words of 8 four-bit values along `axis`: word w holds value 8w + order[i] in nibble i."""
    v = np.moveaxis(values.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = np.zeros(v.shape[:-1], np.uint32)
    for i, j in enumerate(order):
        words |= v[..., j] << np.uint32(4 * i)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


def write_tiny_int4_checkpoint(
    path: str | os.PathLike[str],
    method: str,
    dense_path: str | os.PathLike[str],
    *,
    group_size: int = 32,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny 4-bit checkpoint in AutoAWQ's GEMM layout (`method="awq"`) or AutoGPTQ's
    (`"gptq"`, no act-order) at `path`, and at `dense_path` the same model with every projection
    dequantized from the same integers: ((code - zero) * scale), the reference to compare with.
    Other keyword arguments go to `write_tiny_checkpoint` (architecture, sizes, dtype="float16")."""
    if method not in ("awq", "gptq"):
        raise ValueError(f"method must be 'awq' or 'gptq', got {method!r}")
    kwargs.setdefault("dtype", "float16")
    dense_dir = write_tiny_checkpoint(dense_path, seed=seed, **kwargs)
    tensors = safetensors.numpy.load_file(str(dense_dir / "model.safetensors"))
    rng = np.random.default_rng(seed + 1)
    quantized = {}
    for name in list(tensors):
        if not (name.endswith(".weight") and any(f".{p}.weight" in name for p in _INT4_PROJECTIONS)):
            quantized[name] = tensors[name]
            continue
        out_f, in_f = tensors[name].shape
        if in_f % group_size or in_f % 8 or out_f % 8:
            raise ValueError(f"{name} {tensors[name].shape}: sizes must be multiples of 8 and of group_size")
        codes = rng.integers(0, 16, (in_f, out_f))
        zeros = rng.integers(1 if method == "gptq" else 0, 16, (in_f // group_size, out_f))
        scales = (rng.uniform(0.5, 1.5, (in_f // group_size, out_f)) * 0.02).astype(np.float16)
        dense = (codes - np.repeat(zeros, group_size, 0)) * np.repeat(scales.astype(np.float32), group_size, 0)
        # the reference, [out, in]; contiguous, since safetensors writes an array's memory as is
        tensors[name] = np.ascontiguousarray(dense.T.astype(tensors[name].dtype))
        stem = name[: -len(".weight")]
        if method == "awq":
            quantized[stem + ".qweight"] = _pack_nibbles(codes, 1, _AWQ_ORDER)
            quantized[stem + ".qzeros"] = _pack_nibbles(zeros, 1, _AWQ_ORDER)
        else:
            quantized[stem + ".qweight"] = _pack_nibbles(codes, 0)
            quantized[stem + ".qzeros"] = _pack_nibbles(zeros - 1, 1)  # AutoGPTQ stores zero - 1
            quantized[stem + ".g_idx"] = (np.arange(in_f) // group_size).astype(np.int32)
        quantized[stem + ".scales"] = scales
    safetensors.numpy.save_file(tensors, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(out)
    for f in dense_dir.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
        if method == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False,
         "checkpoint_format": "gptq"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.numpy.save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, dense_dir
