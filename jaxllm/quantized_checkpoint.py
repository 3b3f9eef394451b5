"""Checkpoints of quantized params, as `jaxllm quantize` writes them: a Hugging Face directory
(config.json, tokenizer files) whose `model.safetensors` holds our param layout, each quantized
weight as its fields (`layers.3.wqkv.packed`, `.scale`, ...), and whose config.json carries
`quantization_config = {"quant_method": "jaxllm", "method": ..., "group_size": ...}`.
Loading one needs no calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.flax import load_file, save_file

from jaxllm.checkpoint import CheckpointError, read_hf_config
from jaxllm.config import ModelConfig
from jaxllm.hf_quantized import FORMATS as HF_FORMATS, check_config as check_hf_config
from jaxllm.quantization import FP4_BLOCK, GROUP_SIZE, METHODS, FP4Weight, Int4Weight, QuantizedWeight, W8A8Weight
from models import get_model_spec

FORMAT = "jaxllm"
FORMAT_VERSION = 1
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "training.json")


def checkpoint_quantization(model_dir: str | Path) -> dict | None:
    """The checkpoint's quantization_config if we read it (ours, AWQ, GPTQ); None if it has none;
    a ValueError naming what is supported for any other."""
    cfg = read_hf_config(model_dir).get("quantization_config")
    if cfg is None:
        return None
    method = cfg.get("quant_method")
    if method in HF_FORMATS:
        check_hf_config(model_dir, cfg)
        return cfg
    if method != FORMAT:
        raise ValueError(
            f"{model_dir}: checkpoint quantized as {method!r}, which jaxllm cannot load yet; supported: "
            f"unquantized checkpoints (quantize at load with quantization={METHODS[0]!r} or 'int4'), "
            f"4-bit AWQ (GEMM) and GPTQ (no act-order) checkpoints, and checkpoints written by "
            f"`jaxllm quantize` (quant_method {FORMAT!r})")
    if cfg.get("format_version") != FORMAT_VERSION or cfg.get("method") not in METHODS:
        raise ValueError(f"{model_dir}: unsupported jaxllm quantization_config {cfg}; this version reads "
                         f"format_version {FORMAT_VERSION} with a method in {METHODS}")
    return cfg


def _flatten(params: dict) -> dict[str, jax.Array]:
    flat = {}

    def put(prefix, w):
        if isinstance(w, QuantizedWeight):
            flat[f"{prefix}.q"], flat[f"{prefix}.scale"] = w.q, w.scale
        elif isinstance(w, Int4Weight):
            for field in ("packed", "scale", "zero", "input_scale"):
                flat[f"{prefix}.{field}"] = getattr(w, field)
        elif isinstance(w, FP4Weight):
            for field in ("packed", "block_scale", "global_scale"):
                flat[f"{prefix}.{field}"] = getattr(w, field)
        elif isinstance(w, W8A8Weight):
            # fp8 codes go in as their bytes: safetensors' numpy side has no float8 type
            flat[f"{prefix}.q"] = jax.lax.bitcast_convert_type(w.q, jnp.uint8) if w.kind == "fp8" else w.q
            flat[f"{prefix}.scale"], flat[f"{prefix}.input_scale"] = w.scale, w.input_scale
        else:
            flat[prefix] = w

    for name, w in params.items():
        if name != "layers":
            put(name, w)
    for i, layer in enumerate(params["layers"]):
        for name, w in layer.items():
            put(f"layers.{i}.{name}", w)
    return {k: jax.device_get(v) for k, v in flat.items()}


def save_quantized(params: dict, src_dir: str | Path, out_dir: str | Path, method: str,
                   group_size: int = GROUP_SIZE, extra: dict | None = None) -> Path:
    """Writes `params` (unrolled layers) with src_dir's config, tokenizer and generation files."""
    src, out = Path(src_dir), Path(out_dir)
    if not isinstance(params["layers"], list):
        raise ValueError("save_quantized takes unrolled layers (a list of per-layer dicts)")
    out.mkdir(parents=True, exist_ok=True)
    cfg = read_hf_config(src)
    cfg["quantization_config"] = {"quant_method": FORMAT, "format_version": FORMAT_VERSION, "method": method,
                                  "group_size": group_size, **(extra or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in _COPIED:
        if (src / name).is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src / name, out / name)
    save_file(_flatten(params), str(out / "model.safetensors"), metadata={"format": FORMAT})
    return out


def load_quantized(model_dir: str | Path, config: ModelConfig, mesh: Mesh, quant: dict) -> dict:
    """The params of a quantized checkpoint (ours, AWQ or GPTQ), unrolled, replicated on `mesh`."""
    if quant["quant_method"] in HF_FORMATS:
        from jaxllm.hf_quantized import load_hf_int4

        return load_hf_int4(model_dir, config, mesh, quant)
    if mesh.devices.size > 1:
        raise ValueError("quantized checkpoints load on one device for now (tensor_parallel_size=1)")
    path = Path(model_dir) / "model.safetensors"
    try:
        flat = load_file(str(path))
    except Exception as err:  # missing or corrupt file
        raise CheckpointError(f"cannot read {path}: {err}") from None
    model = get_model_spec(config.architecture).model
    shapes = model.param_shapes(config)
    dtype = jnp.dtype(config.dtype)

    def take(key):
        if key not in flat:
            raise CheckpointError(f"{path} lacks tensor {key!r}")
        return flat.pop(key)

    def get(prefix, name, shape):
        if name not in model.INPUT_AXES:
            return take(prefix).astype(dtype)
        if quant["method"] == "int8":
            return QuantizedWeight(take(f"{prefix}.q"), take(f"{prefix}.scale"))
        if quant["method"] in FP4_BLOCK:
            return FP4Weight(take(f"{prefix}.packed"), take(f"{prefix}.block_scale"), take(f"{prefix}.global_scale"),
                             tuple(shape), quant["method"])
        if quant["method"] in ("fp8", "smoothquant"):
            kind = "fp8" if quant["method"] == "fp8" else "int8"
            q = take(f"{prefix}.q")
            q = jax.lax.bitcast_convert_type(q, jnp.float8_e4m3fn) if kind == "fp8" else q
            return W8A8Weight(q, take(f"{prefix}.scale"), take(f"{prefix}.input_scale"), kind)
        fields = {f: take(f"{prefix}.{f}") for f in ("packed", "scale", "zero", "input_scale")}
        return Int4Weight(**fields, shape=tuple(shape), group_size=int(quant["group_size"]))

    params = {name: get(name, name, shape) for name, shape in shapes.items() if name != "layers"}
    params["layers"] = [{name: get(f"layers.{i}.{name}", name, shape[1:]) for name, shape in shapes["layers"].items()}
                        for i in range(config.num_layers)]
    if flat:
        raise CheckpointError(f"{path} holds tensors this model does not use: {sorted(flat)[:5]}")
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
