"""Medusa heads (Cai et al. 2024): K small heads on the base model's last hidden state, each
guessing one more future token, and the candidate tree their guesses are verified along.

Heads are a params pytree, heads stacked on the leading axis (K heads, Lr residual blocks each,
hidden size D, vocabulary V), weights in [in, out] layout like the rest of jaxllm:

    w_res [K, Lr, D, D], b_res [K, Lr, D]   residual blocks: x <- x + SiLU(x @ w + b)
    w_out [K, D, V]                         output projection, no bias

which is FasterDecoding/Medusa's head `Sequential(ResBlock x Lr, Linear(D, V, bias=False))`.
Head k, fed the hidden state h_t of position t, proposes the token at position t + k + 2 (the base
model's own lm_head proposes t + 1).

On disk the heads use Medusa's published layout: `config.json` with `medusa_num_heads` and
`medusa_num_layers`, weights in `medusa_lm_head.safetensors` (or the pickle `medusa_lm_head.pt`),
keys `{head}.{layer}.linear.weight|bias` and `{head}.{num_layers}.weight` in torch [out, in] layout.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxllm import ops
from jaxllm.config import ModelConfig

Heads = dict  # {"w_res": [K, Lr, D, D], "b_res": [K, Lr, D], "w_out": [K, D, V]}

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "medusa_lm_head.safetensors"
PICKLE_FILE = "medusa_lm_head.pt"
# Medusa-2 checkpoints save the whole model; their heads sit under this prefix.
_KEY_PREFIX = "medusa_head."
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    """Shape of a set of Medusa heads."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int

    def __post_init__(self):
        for name, low in (("num_heads", 1), ("num_layers", 0), ("hidden_size", 1), ("vocab_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MedusaConfig {name} must be an integer >= {low}, got {value!r}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every array of the heads pytree."""
        K, L, D, V = self.num_heads, self.num_layers, self.hidden_size, self.vocab_size
        return {"w_res": (K, L, D, D), "b_res": (K, L, D), "w_out": (K, D, V)}


def _check_dtype(dtype) -> jnp.dtype:
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype {dtype!r} not understood; use one of {tuple(_NP_DTYPES)}") from None
    if dtype.name not in _NP_DTYPES:
        raise ValueError(f"dtype {dtype.name!r} not supported for Medusa heads; use one of {tuple(_NP_DTYPES)}")
    return dtype


def init_medusa_heads(
    key: jax.Array,
    config: MedusaConfig,
    dtype="float32",
    lm_head: Float[Array, "D V"] | None = None,
) -> Heads:
    """Fresh heads: residual blocks zero (each starts as the identity), output layer a copy of the
    base model's `lm_head` [D, V] when given, else torch's default Linear init.

    Medusa zeroes the blocks' weights only; zeroing their biases too makes every fresh head equal to
    the base model's lm_head exactly.
    """
    dtype = _check_dtype(dtype)
    shapes = config.shapes()
    K, D, V = config.num_heads, config.hidden_size, config.vocab_size
    if lm_head is None:
        bound = 1.0 / np.sqrt(D)
        w_out = jax.random.uniform(key, shapes["w_out"], jnp.float32, -bound, bound)
    else:
        if tuple(lm_head.shape) != (D, V):
            raise ValueError(f"lm_head has shape {tuple(lm_head.shape)}; the heads need [hidden_size, "
                             f"vocab_size] = {(D, V)}")
        w_out = jnp.broadcast_to(jnp.asarray(lm_head, jnp.float32), (K, D, V))
    return {
        "w_res": jnp.zeros(shapes["w_res"], dtype),
        "b_res": jnp.zeros(shapes["b_res"], dtype),
        "w_out": w_out.astype(dtype),
    }


def config_of(heads: Heads) -> MedusaConfig:
    """The MedusaConfig a heads pytree has the shapes of (checked for consistency)."""
    if not isinstance(heads, dict) or set(heads) != {"w_res", "b_res", "w_out"}:
        keys = sorted(heads) if isinstance(heads, dict) else type(heads).__name__
        raise ValueError(f"Medusa heads must be a dict with keys b_res, w_out, w_res; got {keys}")
    if heads["w_out"].ndim != 3 or heads["w_res"].ndim != 4:
        raise ValueError(f"Medusa heads: w_out must be [K, D, V] and w_res [K, Lr, D, D], got shapes "
                         f"{tuple(heads['w_out'].shape)} and {tuple(heads['w_res'].shape)}")
    K, D, V = heads["w_out"].shape
    config = MedusaConfig(int(K), int(heads["w_res"].shape[1]), int(D), int(V))
    for name, want in config.shapes().items():
        if tuple(heads[name].shape) != want:
            raise ValueError(f"Medusa heads: {name} has shape {tuple(heads[name].shape)}, expected {want} "
                             f"(from w_out {(K, D, V)} and {config.num_layers} residual layers)")
    return config


def medusa_logits(heads: Heads, hidden: Float[Array, "*B D"]) -> Float[Array, "*B K V"]:
    """Every head's logits for each hidden state (any leading axes), in float32."""
    K, Lr = heads["w_res"].shape[:2]
    if hidden.shape[-1] != heads["w_out"].shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the Medusa heads' "
                         f"hidden size {heads['w_out'].shape[1]}")
    x = jnp.broadcast_to(hidden[..., None, :], (*hidden.shape[:-1], K, hidden.shape[-1]))
    x = x.astype(heads["w_out"].dtype)
    for layer in range(Lr):
        h = ops.einsum("...kd,kde->...ke", x, heads["w_res"][:, layer])
        x = x + jax.nn.silu(h + heads["b_res"][:, layer].astype(h.dtype))
    return ops.einsum("...kd,kdv->...kv", x, heads["w_out"]).astype(jnp.float32)


# -- checkpoints ---------------------------------------------------------------------------------

def _read_config_json(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {str(path)!r}: not a Medusa heads directory "
                                f"(expected {CONFIG_FILE} and {SAFETENSORS_FILE} or {PICKLE_FILE})")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
    for name, low in (("medusa_num_heads", 1), ("medusa_num_layers", 0)):
        value = cfg.get(name)
        if name not in cfg:
            raise ValueError(f"{file} has no {name!r}; Medusa configs need medusa_num_heads and "
                             f"medusa_num_layers")
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{file}: {name} must be an integer >= {low}, got {value!r}")
    return cfg


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    """Head tensors by their Medusa key (any `medusa_head.` prefix removed)."""
    safetensors_file, pickle_file = path / SAFETENSORS_FILE, path / PICKLE_FILE
    if safetensors_file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(safetensors_file, "np") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {safetensors_file}: corrupt or not a safetensors file ({err})") from None
    elif pickle_file.is_file():
        if not allow_pickle:
            raise ValueError(f"{path} holds only the pickle {PICKLE_FILE}; pickle files can run arbitrary "
                             f"code and are refused. Convert it to {SAFETENSORS_FILE}, or pass "
                             "allow_pickle=True if you trust its source.")
        from jaxllm.checkpoint import _load_pickles

        raw = _load_pickles([pickle_file])
    else:
        raise FileNotFoundError(f"no Medusa weights in {str(path)!r}: expected {SAFETENSORS_FILE} "
                                f"or {PICKLE_FILE}")
    return {k.removeprefix(_KEY_PREFIX): v for k, v in raw.items()}


def _check_model_match(source: str, hidden: int | None, vocab: int | None, model: ModelConfig) -> None:
    if hidden is not None and hidden != model.hidden_size:
        raise ValueError(f"Medusa heads in {source} have hidden size {hidden}, but the model's "
                         f"hidden_size is {model.hidden_size}; heads must be trained for this model")
    if vocab is not None and vocab != model.vocab_size:
        raise ValueError(f"Medusa heads in {source} have a vocabulary of {vocab}, but the model's "
                         f"vocab_size is {model.vocab_size}; heads must be trained for this model")


def load_medusa_heads(
    path: str | Path,
    model_config: ModelConfig,
    *,
    allow_pickle: bool = False,
    num_heads: int | None = None,
) -> tuple[MedusaConfig, Heads]:
    """Reads heads in Medusa's published format, checked against the model, in the model's dtype.

    `num_heads` (default: `medusa_num_heads` of config.json) loads that many heads; a weights file
    may hold more heads than its config names (some published ones do), the rest are ignored.
    Medusa's torch code shares one ResBlock across a head's layers; here each layer has its own.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Medusa heads directory {str(path)!r} does not exist")
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a jaxllm ModelConfig, got {type(model_config).__name__}")
    cfg = _read_config_json(path)
    _check_model_match(str(path / CONFIG_FILE), cfg.get("hidden_size"), cfg.get("vocab_size"), model_config)
    tensors = _read_tensors(path, allow_pickle)
    source = str(path)
    unknown = sorted(k for k in tensors if not _KEY.match(k))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(f"{source} holds tensors that are not Medusa head weights: {shown} (expected "
                         "keys '{head}.{layer}.linear.weight|bias' and '{head}.{num_layers}.weight')")
    K = cfg["medusa_num_heads"] if num_heads is None else num_heads
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"num_heads must be a positive integer, got {K!r}")
    Lr = cfg["medusa_num_layers"]
    D, V = model_config.hidden_size, model_config.vocab_size

    def get(name: str, want: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            available = sorted({int(_KEY.match(k).group(1)) for k in tensors})
            raise ValueError(f"{source} is missing tensor {name!r} (config: {K} heads of {Lr} layers; "
                             f"heads present: {available})")
        t = tensors[name]
        if t.ndim == 2 and name.endswith(f".{Lr}.weight"):
            _check_model_match(f"{source} ({name} is {list(t.shape)})", t.shape[1], t.shape[0], model_config)
        elif t.ndim == 2:
            _check_model_match(f"{source} ({name} is {list(t.shape)})", t.shape[1], None, model_config)
        if tuple(t.shape) != want:
            raise ValueError(f"tensor {name!r} in {source} has shape {list(t.shape)}, expected {list(want)}")
        return np.asarray(t, np.float32)

    config = MedusaConfig(K, Lr, D, V)
    dtype = _NP_DTYPES[model_config.dtype]
    w_res = np.empty(config.shapes()["w_res"], dtype)
    b_res = np.empty(config.shapes()["b_res"], dtype)
    w_out = np.empty(config.shapes()["w_out"], dtype)
    for k in range(K):
        for layer in range(Lr):
            w_res[k, layer] = get(f"{k}.{layer}.linear.weight", (D, D)).T
            b_res[k, layer] = get(f"{k}.{layer}.linear.bias", (D,))
        w_out[k] = get(f"{k}.{Lr}.weight", (V, D)).T
    return config, {"w_res": jnp.asarray(w_res), "b_res": jnp.asarray(b_res), "w_out": jnp.asarray(w_out)}


def save_medusa_heads(
    path: str | Path,
    config: MedusaConfig,
    heads: Heads,
    *,
    base_model_name_or_path: str | None = None,
    dtype: str | None = None,
) -> None:
    """Writes config.json and medusa_lm_head.safetensors in Medusa's published layout.

    `dtype` (default: the heads' own) is the stored precision.
    """
    from safetensors.numpy import save_file

    if not isinstance(config, MedusaConfig):
        raise ValueError(f"config must be a MedusaConfig, got {type(config).__name__}")
    if config_of(heads) != config:
        raise ValueError(f"heads have the shapes of {config_of(heads)}, not of the given {config}")
    np_dtype = _NP_DTYPES[_check_dtype(dtype or heads["w_out"].dtype).name]
    host = {k: np.asarray(jax.device_get(v), np.float32) for k, v in heads.items()}
    tensors = {}
    for k in range(config.num_heads):
        for layer in range(config.num_layers):
            tensors[f"{k}.{layer}.linear.weight"] = host["w_res"][k, layer].T
            tensors[f"{k}.{layer}.linear.bias"] = host["b_res"][k, layer]
        tensors[f"{k}.{config.num_layers}.weight"] = host["w_out"][k].T
    tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / SAFETENSORS_FILE, metadata={"format": "pt"})
    cfg = {
        "medusa_num_heads": config.num_heads,
        "medusa_num_layers": config.num_layers,
        "base_model_name_or_path": base_model_name_or_path,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "torch_dtype": np.dtype(np_dtype).name,
    }
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


# -- candidate trees -----------------------------------------------------------------------------

# Medusa's default tree, `mc_sim_7b_63` of FasterDecoding/Medusa's medusa_choices.py: each choice is
# a path of top-k ranks, one per head (depth), so (0, 1) is head 0's top token, then head 1's second.
MEDUSA_DEFAULT_CHOICES: tuple[tuple[int, ...], ...] = tuple(tuple(c) for c in [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8],
    [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0],
    [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0],
    [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1],
    [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
])


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity, usable as a static arg
class MedusaTree:
    """A candidate tree over N = 1 + len(choices) nodes; node 0 is the root (the base model's token).

    Nodes are ordered by (depth, choice), as Medusa orders them, so parents come before children
    and every depth is one contiguous block. Node i's token is the rank[i]-th most likely token of
    head[i], and it sits depth[i] positions after the root.
    """

    choices: tuple[tuple[int, ...], ...]  # sorted; choices[i - 1] is node i's path of ranks
    depth: Int[np.ndarray, "N"]
    head: Int[np.ndarray, "N"]  # depth - 1; root -1
    rank: Int[np.ndarray, "N"]  # root 0
    parent: Int[np.ndarray, "N"]  # root -1
    ancestor_mask: Bool[np.ndarray, "N N"]  # [i, j]: j is i or an ancestor of i
    paths: Int[np.ndarray, "P max_depth+1"]  # root-to-leaf node indices by leaf index, -1 padded

    @property
    def num_nodes(self) -> int:
        return len(self.depth)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def top_k(self) -> int:
        """Candidates needed from each head: one more than the largest rank."""
        return int(self.rank.max()) + 1


def _normalize_choices(choices, num_heads: int) -> tuple[tuple[int, ...], ...]:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise ValueError(f"choices must be a list of paths (lists of top-k ranks), got {type(choices).__name__}")
    out = []
    for choice in choices:
        if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence) or not choice:
            raise ValueError(f"each choice must be a non-empty list of ranks, got {choice!r}")
        for r in choice:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
                raise ValueError(f"choice {list(choice)} has rank {r!r}; ranks must be integers >= 0")
        out.append(tuple(int(r) for r in choice))
    return tuple(out)


def build_tree(choices: Sequence[Sequence[int]], num_heads: int) -> MedusaTree:
    """The tree of `choices` (paths of top-k ranks, one per head) for `num_heads` heads."""
    choices = _normalize_choices(choices, num_heads)
    seen = set()
    for choice in choices:
        if choice in seen:
            raise ValueError(f"choice {list(choice)} appears twice")
        seen.add(choice)
        if len(choice) > num_heads:
            raise ValueError(f"choice {list(choice)} has depth {len(choice)}, deeper than the "
                             f"{num_heads} Medusa heads; use truncate_choices(choices, {num_heads})")
    for choice in choices:
        for d in range(1, len(choice)):
            if choice[:d] not in seen:
                raise ValueError(f"choice {list(choice)} needs its prefix {list(choice[:d])} in the tree too")

    ordered = tuple(sorted(choices, key=lambda c: (len(c), c)))
    index = {c: i + 1 for i, c in enumerate(ordered)}
    n = len(ordered) + 1
    depth = np.array([0] + [len(c) for c in ordered], np.int32)
    rank = np.array([0] + [c[-1] for c in ordered], np.int32)
    parent = np.array([-1] + [index.get(c[:-1], 0) for c in ordered], np.int32)
    ancestor = np.eye(n, dtype=bool)
    for i in range(1, n):  # parents come first, so each parent's row is complete
        ancestor[i] |= ancestor[parent[i]]
    is_leaf = np.ones(n, bool)
    is_leaf[parent[1:]] = False
    width = int(depth.max()) + 1
    paths = []
    for leaf in np.flatnonzero(is_leaf):
        path = [int(leaf)]
        while path[-1] != 0:
            path.append(int(parent[path[-1]]))
        paths.append(path[::-1] + [-1] * (width - len(path)))
    arrays = {"depth": depth, "head": depth - 1, "rank": rank, "parent": parent,
              "ancestor_mask": ancestor, "paths": np.array(paths, np.int32)}
    for a in arrays.values():
        a.setflags(write=False)
    return MedusaTree(choices=ordered, **arrays)


def truncate_choices(choices: Sequence[Sequence[int]], num_heads: int) -> tuple[tuple[int, ...], ...]:
    """The choices no deeper than `num_heads` (still a valid tree: prefixes are shallower)."""
    return tuple(c for c in _normalize_choices(choices, num_heads) if len(c) <= num_heads)


def default_tree(num_heads: int) -> MedusaTree:
    """Medusa's default tree, cut to the depth `num_heads` heads can fill."""
    return build_tree(truncate_choices(MEDUSA_DEFAULT_CHOICES, num_heads), num_heads)


def tree_candidates(
    base_token: Int[Array, "B"], head_logits: Float[Array, "B K V"], tree: MedusaTree
) -> Int[Array, "B N"]:
    """Each node's token: the root is `base_token`; node i the rank[i]-th most likely of head[i]."""
    if not isinstance(tree, MedusaTree):
        raise ValueError(f"tree must be a MedusaTree (see build_tree), got {type(tree).__name__}")
    if head_logits.ndim != 3 or base_token.shape != head_logits.shape[:1]:
        raise ValueError(f"expected base_token [B] and head_logits [B, K, V], got shapes "
                         f"{tuple(base_token.shape)} and {tuple(head_logits.shape)}")
    if tree.max_depth > head_logits.shape[1]:
        raise ValueError(f"the tree is {tree.max_depth} deep but there are only {head_logits.shape[1]} "
                         f"heads' logits; build the tree for {head_logits.shape[1]} heads")
    if tree.top_k > head_logits.shape[2]:
        raise ValueError(f"the tree needs each head's top {tree.top_k} tokens, more than the "
                         f"vocabulary of {head_logits.shape[2]}")
    if tree.num_nodes == 1:
        return base_token[:, None].astype(jnp.int32)
    _, top = ops.top_k(head_logits, tree.top_k)  # [B, K, top_k]
    picked = top[:, tree.head[1:], tree.rank[1:]]  # constant indices: the tree is static
    return jnp.concatenate([base_token[:, None].astype(jnp.int32), picked.astype(jnp.int32)], axis=1)
