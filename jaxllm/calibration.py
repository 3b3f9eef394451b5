"""Calibration for activation-aware quantization (AWQ, Lin et al. 2023).

An eager forward over calibration tokens records, for every weight matrix, the inputs that reach
it; AWQ then picks per-input-channel scales s = mean|x|^alpha, alpha on a grid, that minimise the
output error || X W - X Q(diag(s) W) / s ||^2 on those inputs, group-wise int4 round-to-nearest.

Why not qwix (a JAX quantization library with AWQ and GPTQ): its model-level API intercepts Flax
modules (patching jax's primitive binding) and brings Flax as a dependency, while our models are
plain functions over dicts; its AWQ core scores a weight error weighted by activation magnitude,
not the output error on calibration inputs, and its quantized arrays are not AutoAWQ's int4 +
zero point layout that pre-quantized checkpoints use. The search itself is a few lines, here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxllm.kv_cache import AttentionMeta
from jaxllm.ops.matmul import observe_inputs
from jaxllm.quantization import GROUP_SIZE, dequantize_int4, quantize_int4
from models import get_model_spec


@dataclasses.dataclass
class InputStats:
    """What reached one weight: mean |x| per input channel, a sample of input rows, and (for
    GPTQ) the sum of x x^T over every row."""

    abs_sum: np.ndarray
    count: int
    rows: list[np.ndarray]
    xtx: np.ndarray | None = None
    abs_max: np.ndarray | None = None

    @property
    def act_scale(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows, axis=0)


def _in_order(stats: dict) -> list:
    """(key, stats) pairs by layer, then name; top-level weights (layer None) last."""
    return sorted(stats.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, kv[0][1]))


def _as_rows(subscripts: str, x: Array, input_count: int) -> np.ndarray:
    """x with the dims the weight contracts (in the weight's order) flattened last: [rows, K]."""
    inputs, out = subscripts.split("->")
    x_sub, w_sub = inputs.split(",")
    x_sub = x_sub.replace("...", "")
    contracted = w_sub[:input_count]
    rest = [c for c in x_sub if c not in contracted]
    x = np.asarray(x, np.float32)
    x = x.reshape(-1, *x.shape[x.ndim - len(x_sub):])  # fold a leading "..." into one axis
    order = [1 + x_sub.index(c) for c in rest] + [1 + x_sub.index(c) for c in contracted]
    x = np.transpose(x, [0, *order])
    k = int(np.prod([x.shape[-len(contracted) + i] for i in range(len(contracted))]))
    return x.reshape(-1, k)


def collect_inputs(params: dict, config, token_rows: Sequence[Sequence[int]], input_axes,
                   max_rows: int = 512, seed: int = 0, second_moment: bool = False) -> dict:
    """{(layer, name): InputStats} over an eager forward of each token row (layers unrolled)."""
    if not isinstance(params["layers"], list):
        raise ValueError("calibration needs unrolled layers (a list of per-layer dicts)")
    model = get_model_spec(config.architecture).model
    where = {id(w): (i, name) for i, layer in enumerate(params["layers"]) for name, w in layer.items()}
    where.update({id(w): (None, name) for name, w in params.items() if name != "layers"})
    stats: dict = {}
    rng = np.random.default_rng(seed)

    def observe(subscripts, x, w):
        key = where.get(id(w))
        if key is None or key[1] not in input_axes:
            return
        rows = _as_rows(subscripts, x, len(input_axes[key[1]]))
        k = rows.shape[1]
        s = stats.setdefault(key, InputStats(np.zeros(k), 0, [], np.zeros((k, k)) if second_moment else None))
        s.abs_sum += np.abs(rows).sum(axis=0)
        s.abs_max = np.maximum(np.abs(rows).max(axis=0), 0 if s.abs_max is None else s.abs_max)
        if s.xtx is not None:
            s.xtx += rows.T.astype(np.float64) @ rows
        s.count += rows.shape[0]
        take = rng.choice(rows.shape[0], min(rows.shape[0], max_rows), replace=False)
        s.rows.append(rows[take])

    with observe_inputs(observe):
        for ids in token_rows:
            tokens = jnp.asarray([list(ids)], jnp.int32)
            positions = jnp.arange(tokens.shape[1])[None]
            meta = AttentionMeta(positions, jnp.zeros((1, 1), jnp.int32), jnp.asarray([tokens.shape[1]]))
            hidden, _ = model.forward_hidden(params, tokens, meta, None, config)
            model.logits(params, hidden[:, -1:])
    for s in stats.values():  # keep at most max_rows rows, drawn over all calibration rows
        sample = s.sample()
        s.rows = [sample[rng.choice(sample.shape[0], min(sample.shape[0], max_rows), replace=False)]]
    return stats


def awq_input_scale(w: Float[Array, "..."], input_axes: tuple[int, ...], stats: InputStats,
                    group_size: int = GROUP_SIZE, grid: int = 20) -> tuple[np.ndarray, dict]:
    """The per-input-channel scale of the best alpha on the grid (alpha = 0 is plain RTN)."""
    x = jnp.asarray(stats.sample())
    k = x.shape[1]
    w2 = jnp.asarray(w, jnp.float32).reshape(k, -1)
    ref = x @ w2
    act = jnp.asarray(stats.act_scale, jnp.float32)
    act = jnp.maximum(act / jnp.maximum(act.max(), 1e-8), 1e-4)
    losses, scales = [], []
    for alpha in np.linspace(0.0, 1.0, grid):
        s = act**alpha
        s = s / jnp.sqrt(s.max() * s.min())
        q = quantize_int4(w2, (0,), group_size, s)
        losses.append(float(jnp.mean((x @ dequantize_int4(q) - ref) ** 2)))
        scales.append(np.asarray(s))
    best = int(np.argmin(losses))
    return scales[best], dict(alpha=float(np.linspace(0.0, 1.0, grid)[best]), loss=losses[best],
                              rtn_loss=losses[0])


def awq_scales(params: dict, config, token_rows, input_axes, group_size: int = GROUP_SIZE,
               progress: bool = False) -> tuple[dict, dict]:
    """Calibrated input scales {(layer, name): scale} and per-weight search reports."""
    from tqdm.auto import tqdm

    stats = collect_inputs(params, config, token_rows, input_axes)
    scales, report = {}, {}
    for (layer, name), s in tqdm(_in_order(stats),
                                 desc="awq search", disable=not progress, leave=False):
        w = params[name] if layer is None else params["layers"][layer][name]
        scales[layer, name], report[layer, name] = awq_input_scale(w, input_axes[name], s, group_size)
    return scales, report


def gptq_quantize(w: Float[Array, "..."], input_axes: tuple[int, ...], stats: InputStats,
                  group_size: int = GROUP_SIZE, damp: float = 0.01):
    """GPTQ (Frantar et al. 2022) into our int4 format: inputs quantized one at a time in order
    (no act-order), each one's rounding error spread over the inputs not yet quantized through the
    inverse Hessian of the layer's inputs, H = X^T X; each group's scale and zero point are taken
    from its weights as updated when the group starts."""
    from jaxllm.quantization import Int4Weight, int4_groups, pack_nibbles

    if stats.xtx is None:
        raise ValueError("GPTQ needs the inputs' second moment: collect_inputs(..., second_moment=True)")
    shape = tuple(w.shape)
    k = stats.xtx.shape[0]
    W = np.asarray(w, np.float64).reshape(k, -1).T.copy()  # [N, K]: rows are outputs
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {k}")
    H = stats.xtx / max(stats.count, 1)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(k)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular
    codes = np.zeros_like(W, dtype=np.uint8)
    scales = np.zeros((k // group_size, W.shape[0]))
    zeros = np.zeros((k // group_size, W.shape[0]), np.uint8)
    for g0 in range(0, k, group_size):  # one block per group
        g1 = g0 + group_size
        _, scale, zero = (np.asarray(a) for a in int4_groups(jnp.asarray(W[:, g0:g1].T, jnp.float32), group_size))
        scale, zero = scale[0].astype(np.float64), zero[0].astype(np.float64)
        scales[g0 // group_size], zeros[g0 // group_size] = scale, zero
        block, err = W[:, g0:g1].copy(), np.zeros((W.shape[0], group_size))
        Hb = Hinv[g0:g1, g0:g1]
        for i in range(group_size):
            col = block[:, i]
            q = np.clip(np.round(col / scale) + zero, 0, 15)
            codes[:, g0 + i] = q
            e = (col - (q - zero) * scale) / Hb[i, i]
            block[:, i:] -= np.outer(e, Hb[i, i:])
            err[:, i] = e
        W[:, g1:] -= err @ Hinv[g0:g1, g1:]
    return Int4Weight(pack_nibbles(jnp.asarray(codes.T)), jnp.asarray(scales, jnp.float32), jnp.asarray(zeros),
                      jnp.ones((k,), jnp.float32), shape, group_size)


def gptq_params(params: dict, config, token_rows, input_axes, group_size: int = GROUP_SIZE,
                progress: bool = False) -> dict:
    """The params with every weight in `input_axes` GPTQ-quantized from one calibration pass."""
    from tqdm.auto import tqdm

    stats = collect_inputs(params, config, token_rows, input_axes, second_moment=True)
    out = {**params, "layers": [dict(layer) for layer in params["layers"]]}
    for (layer, name), s in tqdm(_in_order(stats),
                                 desc="gptq", disable=not progress, leave=False):
        tree = out if layer is None else out["layers"][layer]
        tree[name] = gptq_quantize(tree[name], input_axes[name], s, group_size)
    return out


def _fake_w8a8(x, w2, s, kind: str):
    """x @ w2 with x / s quantized per row and diag(s) w2 per column, as the runtime does."""
    from jaxllm.quantization import QMAX, to_codes

    xs, ws = x / s, w2 * s[:, None]
    sx = jnp.maximum(jnp.max(jnp.abs(xs), axis=1, keepdims=True), 1e-12) / QMAX[kind]
    sw = jnp.maximum(jnp.max(jnp.abs(ws), axis=0, keepdims=True), 1e-12) / QMAX[kind]
    qx = to_codes(xs / sx, kind).astype(jnp.float32) * sx
    qw = to_codes(ws / sw, kind).astype(jnp.float32) * sw
    return qx @ qw


def smoothquant_input_scale(w: Float[Array, "..."], stats: InputStats, kind: str = "int8",
                            grid: int = 11) -> tuple[np.ndarray, dict]:
    """SmoothQuant's s_j = max|x_j|^a / max|w_j|^(1-a), with the migration strength a calibrated:
    the grid point with the least output error of the 8-bit product on the calibration rows."""
    x = jnp.asarray(stats.sample())
    k = x.shape[1]
    w2 = jnp.asarray(w, jnp.float32).reshape(k, -1)
    ref = x @ w2
    x_max = jnp.maximum(jnp.asarray(stats.abs_max, jnp.float32), 1e-5)
    w_max = jnp.maximum(jnp.max(jnp.abs(w2), axis=1), 1e-5)
    losses, scales = [], []
    for alpha in np.linspace(0.0, 1.0, grid):
        s = jnp.clip(x_max**alpha / w_max ** (1 - alpha), 1e-5, 1e5)
        losses.append(float(jnp.mean((_fake_w8a8(x, w2, s, kind) - ref) ** 2)))
        scales.append(np.asarray(s))
    best = int(np.argmin(losses))
    no_smoothing = float(jnp.mean((_fake_w8a8(x, w2, jnp.ones((k,)), kind) - ref) ** 2))
    return scales[best], dict(alpha=float(np.linspace(0.0, 1.0, grid)[best]), loss=losses[best],
                              unsmoothed_loss=no_smoothing)


def smoothquant_scales(params: dict, config, token_rows, input_axes, kind: str = "int8",
                       progress: bool = False) -> tuple[dict, dict]:
    """Calibrated SmoothQuant scales {(layer, name): s} and per-weight reports."""
    from tqdm.auto import tqdm

    stats = collect_inputs(params, config, token_rows, input_axes)
    scales, report = {}, {}
    for (layer, name), s in tqdm(_in_order(stats),
                                 desc="smoothquant", disable=not progress, leave=False):
        w = params[name] if layer is None else params["layers"][layer][name]
        scales[layer, name], report[layer, name] = smoothquant_input_scale(w, s, kind)
    return scales, report
