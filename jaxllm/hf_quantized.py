"""Pre-quantized Hugging Face checkpoints: AutoAWQ (GEMM layout) and GPTQ (no act-order), 4 bits.

Both store each linear layer as int4 codes packed into int32, a zero point per (group of inputs,
output) and a float16 scale, so W[in, out] = (code - zero) * scale. We read the same integers into
our `Int4Weight` (codes packed along the input dimension), passing codes, zeros and scales through
the model's own HF -> param layout conversion (a pure permutation), so the loaded weight dequantizes
to exactly what the checkpoint's own dequantization gives.

- AWQ: qweight int32 [in, out/8] and qzeros int32 [in/g, out/8] packed along outputs in AutoAWQ's
  order (output 8c + [0, 2, 4, 6, 1, 3, 5, 7][i] in nibble i), scales [in/g, out].
- GPTQ: qweight int32 [in/8, out] packed along inputs (input 8r + i in nibble i), qzeros int32
  [in/g, out/8] packed along outputs in order, stored minus one (AutoGPTQ's format), scales
  [in/g, out], g_idx [in] (must be input // g: act-order checkpoints are refused).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from jaxllm.checkpoint import CheckpointError
from jaxllm.config import ModelConfig
from jaxllm.quantization import Int4Weight, pack_nibbles
from models import get_model_spec

FORMATS = ("awq", "gptq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def check_config(model_dir, quant: dict) -> int:
    """The group size of a supported AWQ/GPTQ quantization_config, or a ValueError saying why not."""
    method = quant.get("quant_method")
    if quant.get("bits") != 4:
        raise ValueError(f"{model_dir}: {method} with bits={quant.get('bits')}; jaxllm reads 4-bit only")
    if method == "awq" and str(quant.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"{model_dir}: AWQ version {quant.get('version')!r}; jaxllm reads the GEMM layout")
    if method == "awq" and quant.get("zero_point", True) is False:
        raise ValueError(f"{model_dir}: AWQ without zero points is not supported")
    if method == "gptq" and quant.get("desc_act"):
        raise ValueError(f"{model_dir}: GPTQ with act-order (desc_act=true) is not supported")
    if method == "gptq" and quant.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{model_dir}: GPTQ checkpoint_format {quant.get('checkpoint_format')!r}; "
                         "jaxllm reads 'gptq'")
    group = int(quant.get("group_size", 128))
    if group <= 0:
        raise ValueError(f"{model_dir}: group_size {group}: per-channel (-1) GPTQ is not supported")
    return group


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, cols/8] -> int codes [rows, cols], AutoAWQ's column order undone."""
    nibbles = [(packed >> (4 * i)) & 15 for i in range(8)]
    out = np.empty((packed.shape[0], packed.shape[1] * 8), np.int32)
    for i, col in enumerate(AWQ_ORDER):
        out[:, col::8] = nibbles[i]
    return out


def unpack_rows(packed: np.ndarray) -> np.ndarray:
    """int32 [rows/8, cols] packed along rows (GPTQ qweight) -> [rows, cols]."""
    return np.stack([(packed >> (4 * i)) & 15 for i in range(8)], axis=1).reshape(-1, packed.shape[1])


def unpack_cols(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, cols/8] packed along columns in order (GPTQ qzeros) -> [rows, cols]."""
    return np.stack([(packed >> (4 * i)) & 15 for i in range(8)], axis=2).reshape(packed.shape[0], -1)


def _linear(get, name: str, method: str, group: int):
    """Codes, zeros and scales of one linear layer, each as a dense [out, in] array (HF weight
    layout), zeros and scales repeated over their group's inputs."""
    qweight, qzeros, scales = get(name + ".qweight"), get(name + ".qzeros"), get(name + ".scales")
    if method == "awq":
        codes, zeros = unpack_awq(qweight), unpack_awq(qzeros)
    else:
        codes, zeros = unpack_rows(qweight), unpack_cols(qzeros) + 1
        g_idx = get(name + ".g_idx", optional=True)
        if g_idx is not None and not np.array_equal(g_idx, np.arange(codes.shape[0]) // group):
            raise CheckpointError(f"{name}.g_idx is not input // group_size: act-order is not supported")
    if codes.shape[0] % group or scales.shape != (codes.shape[0] // group, codes.shape[1]):
        raise CheckpointError(f"{name}: codes {codes.shape}, scales {scales.shape} do not match group size {group}")
    expand = lambda a: np.repeat(a, group, axis=0).T
    return codes.T.astype(np.float32), expand(zeros.astype(np.float32)), expand(scales.astype(np.float32))


def load_hf_int4(model_dir: str | Path, config: ModelConfig, mesh: Mesh, quant: dict) -> dict:
    """The params of an AWQ or GPTQ checkpoint (unrolled layers), replicated on `mesh`."""
    if mesh.devices.size > 1:
        raise ValueError("AWQ/GPTQ checkpoints load on one device for now (tensor_parallel_size=1)")
    method, group = quant["quant_method"], check_config(model_dir, quant)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no weights in {model_dir}: expected *.safetensors files")
    where = {}
    for f in files:
        with safe_open(f, "np") as h:
            where.update({k: f for k in h.keys()})

    def get(name, optional=False):
        if name not in where:
            if optional:
                return None
            raise CheckpointError(f"{model_dir} lacks tensor {name!r} ({method} checkpoint)")
        with safe_open(where[name], "np") as h:
            return h.get_tensor(name)

    spec = get_model_spec(config.architecture)
    model, ckpt = spec.model, spec.checkpoint
    dtype = np.dtype(jax.numpy.dtype(config.dtype))
    shapes = model.param_shapes(config)
    layers = []
    for i in range(config.num_layers):
        names = ckpt.hf_layer_names(config, i)
        dense = {n: get(n).astype(dtype) for n in names if not any(f".{p}.weight" in n for p in _PROJECTIONS)}
        parts = [{}, {}, {}]  # codes, zeros, scales, each under the HF weight names
        for proj in _PROJECTIONS:
            name = f"model.layers.{i}.{proj}"
            for part, value in zip(parts, _linear(get, name, method, group)):
                part[name + ".weight"] = value
        codes, zeros, scales = (ckpt.convert_layer(config, i, {**dense, **p}) for p in parts)
        layer = {k: v for k, v in ckpt.convert_layer(config, i, {**dense, **parts[0]}).items()
                 if k not in model.INPUT_AXES}
        for name, axes in model.INPUT_AXES.items():
            if name == "lm_head":
                continue
            shape = tuple(shapes["layers"][name][1:])
            k = int(np.prod(shape[:len(axes)]))
            as_matrix = lambda a: a.reshape(k, -1)
            layer[name] = Int4Weight(
                packed=pack_nibbles(as_matrix(codes[name]).astype(np.uint8)),
                scale=as_matrix(scales[name])[::group].astype(np.float32),
                zero=as_matrix(zeros[name])[::group].astype(np.uint8),
                input_scale=np.ones((k,), np.float32), shape=shape, group_size=group)
        layers.append(layer)
    top = {hf: get(hf).astype(dtype) for hf in ckpt.hf_global_names(config).values()}
    params = ckpt.convert_global(config, top)
    params["layers"] = layers
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
