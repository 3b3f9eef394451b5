"""Model configuration read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
# "auto": our Pallas kernels where they apply on a GPU, XLA elsewhere; "xla": never kernels;
# "pallas": kernels wherever they apply (interpreted on a CPU: slow, for tests).
ATTENTION_BACKENDS = ("auto", "xla", "pallas")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if not (self.theta > 0 and self.factor > 0):
            raise ValueError(f"rope theta and factor must be positive, got {self.theta}, {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a checkpoint's shape."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    # Per layer: attention window in tokens, 0 for full attention.
    sliding_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    attention_backend: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if len(self.sliding_windows) != self.num_layers:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose one of {DTYPES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} not supported; "
                             f"choose one of {ATTENTION_BACKENDS}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kwargs = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings") if k in params}
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


def _sliding_windows(cfg: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    window = int(cfg.get("sliding_window") or 0)
    if not window or cfg.get("use_sliding_window") is False:
        return (0,) * num_layers
    if cfg.get("layer_types"):
        return tuple(window if t == "sliding_attention" else 0 for t in cfg["layer_types"])
    if "max_window_layers" in cfg:  # Qwen2 before `layer_types`: the first layers use full attention
        first = int(cfg["max_window_layers"])
        return tuple(0 if i < first else window for i in range(num_layers))
    return (window,) * num_layers


def _dtype_from_hf(cfg: dict[str, Any]) -> str:
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return dtype.removeprefix("torch.") if dtype.removeprefix("torch.") in DTYPES else "float32"


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF `config.json` (architecture already checked)."""
    arch = cfg["architectures"][0]
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    layers = cfg["num_hidden_layers"]
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported (no released Llama-family model uses it)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} not supported; only 'silu'")
    model_type = cfg.get("model_type")
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_windows=_sliding_windows(cfg, layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        dtype=_dtype_from_hf(cfg),
    )


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """Reads `config.json`, with an error that says what is missing or broken."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {str(model_dir)!r}: not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(cfg.get("architectures"), list) or not cfg["architectures"]:
        raise ValueError(f"{path} has no 'architectures' list; cannot tell which model it is")
    return cfg


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Inverse frequencies [head_dim/2] as numpy float32, with the checkpoint's scaling applied."""
    import numpy as np

    # float32 as transformers computes it, so positions rotate identically.
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.float32(rope.theta) ** exponent).astype(np.float32)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv
