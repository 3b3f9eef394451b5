"""Load Hugging Face checkpoints (safetensors) into a sharded param pytree."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from jaxllm.config import DTYPES, ModelConfig, config_from_hf, read_hf_config
from jaxllm.sharding import shardings_for
from models import get_model_spec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt or mismatched tensors."""


def load_config(model_dir: str | Path, dtype: str = "auto") -> ModelConfig:
    """ModelConfig of a HF directory; `dtype` "auto" keeps the checkpoint's own."""
    cfg = read_hf_config(model_dir)
    get_model_spec(cfg["architectures"][0])  # unknown architecture -> clear error
    config = config_from_hf(cfg)
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; choose 'auto' or one of {DTYPES}")
        config = config.replace(dtype=dtype)
    extra_eos = _generation_eos_ids(Path(model_dir))
    if extra_eos:
        config = config.replace(eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra_eos)))
    return config


def _generation_eos_ids(model_dir: Path) -> tuple[int, ...]:
    """eos ids of `generation_config.json`; chat models list their end-of-turn token only there."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid JSON object: {err}") from None
    eos = [eos] if isinstance(eos, int) else list(eos or ())
    return tuple(int(t) for t in eos)


class _TensorSource:
    """Name -> file index over a directory's weight files, read lazily, one tensor at a time."""

    def __init__(self, model_dir: Path, allow_pickle: bool):
        self.dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
            self.files = {name: model_dir / f for name, f in weight_map.items()}
            self.pickled = {}
        elif files := sorted(model_dir.glob("*.safetensors")):
            self.files = {name: f for f in files for name in self._keys(f)}
            self.pickled = {}
        elif pickles := sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES):
            if not allow_pickle:
                raise CheckpointError(
                    f"{model_dir} holds only pickle checkpoints ({', '.join(p.name for p in pickles)}); "
                    "pickle files can run arbitrary code and are refused. Convert them to safetensors, "
                    "or pass allow_pickle=True if you trust their source."
                )
            self.pickled = _load_pickles(pickles)
            self.files = {name: None for name in self.pickled}
        else:
            raise CheckpointError(f"no weights in {model_dir}: expected *.safetensors files")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(path, "np") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {path}: corrupt or not a safetensors file ({err})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.pickled:
            return tuple(self.pickled[name].shape)
        with self._open(name) as f:
            if name not in f.keys():  # an index that maps a tensor to a shard without it
                raise CheckpointError(f"checkpoint {self.dir} is missing tensor {name}: the index maps it "
                                      f"to {self.files[name].name}, which does not contain it")
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        if name in self.pickled:
            return self.pickled[name]
        with self._open(name) as f:
            return f.get_tensor(name)

    def _open(self, name: str):
        path = self.files[name]
        try:
            return safe_open(path, "np")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {path}: corrupt or missing ({err})") from None


def _load_pickles(paths: list[Path]) -> dict[str, np.ndarray]:
    import torch  # only for explicitly allowed pickle checkpoints

    tensors = {}
    for path in paths:
        for name, t in torch.load(path, map_location="cpu", weights_only=True).items():
            if t.dtype == torch.bfloat16:
                tensors[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                tensors[name] = t.numpy()
    return tensors


def _validate(source: _TensorSource, expected: dict[str, tuple[int, ...]], model_dir: Path) -> None:
    missing = [name for name in expected if name not in source.files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_dir} is missing tensor(s): {shown}")
    for name, want in expected.items():
        got = source.shape(name)
        if got != want:
            raise CheckpointError(
                f"tensor {name} in {model_dir} has shape {list(got)}, expected {list(want)} from config.json"
            )


def load_params(
    model_dir: str | Path,
    config: ModelConfig,
    mesh: Mesh,
    *,
    allow_pickle: bool = False,
    progress: bool = True,
    layers: str = "unrolled",
) -> dict:
    """Streams, checks and converts every tensor, then places the pytree on `mesh` (see `place`)."""
    check_layer_layout(layers)
    model_dir = Path(model_dir)
    spec = get_model_spec(config.architecture)
    ckpt = spec.checkpoint
    source = _TensorSource(model_dir, allow_pickle)
    _validate(source, ckpt.hf_shapes(config), model_dir)

    np_dtype = NP_DTYPES[config.dtype]
    shapes = spec.model.param_shapes(config)
    host = {k: np.empty(v, np_dtype) for k, v in shapes["layers"].items()}
    for i in tqdm(range(config.num_layers), desc="loading layers", disable=not progress, leave=False):
        tensors = {name: source.get(name) for name in ckpt.hf_layer_names(config, i)}
        for key, value in ckpt.convert_layer(config, i, tensors).items():
            host[key][i] = value.astype(np_dtype)
    top = {hf: source.get(hf) for hf in ckpt.hf_global_names(config).values()}
    params = {k: v.astype(np_dtype) for k, v in ckpt.convert_global(config, top).items()}
    params["layers"] = host
    return place(params, config, mesh, layers)


LAYER_LAYOUTS = ("unrolled", "scan")


def check_layer_layout(layers: str) -> None:
    if layers not in LAYER_LAYOUTS:
        raise ValueError(f"layer layout {layers!r} unknown; choose one of {LAYER_LAYOUTS}")


def place(params: dict, config: ModelConfig, mesh: Mesh, layers: str = "unrolled") -> dict:
    """Puts a host pytree (layers stacked) on `mesh`, each array split by its logical axes.

    `layers="unrolled"` gives each layer its own arrays (a list of dicts), which the forward runs
    unrolled: on an H200 that decodes 2.2x faster than `"scan"` over the stacked arrays, whose
    per-layer slices XLA copies before each matmul (benchmarks/NOTES.md).
    """
    check_layer_layout(layers)
    spec = get_model_spec(config.architecture)
    shardings = shardings_for(spec.model.param_axes(config), spec.model.param_shapes(config), mesh)
    put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    if layers == "scan":
        return jax.tree.map(put, params, shardings)
    placed = {k: jax.tree.map(put, v, shardings[k]) for k, v in params.items() if k != "layers"}
    per_layer = {k: NamedSharding(mesh, PartitionSpec(*s.spec[1:])) for k, s in shardings["layers"].items()}
    placed["layers"] = [{k: put(v[i], per_layer[k]) for k, v in params["layers"].items()}
                        for i in range(config.num_layers)]
    return placed


def random_params(config: ModelConfig, mesh: Mesh, seed: int = 0, scale: float = 0.02) -> dict:
    """Random weights made directly on the devices (for benchmarks of big shapes)."""
    spec = get_model_spec(config.architecture)
    shapes = spec.model.param_shapes(config)
    shardings = shardings_for(spec.model.param_axes(config), shapes, mesh)
    dtype = jnp.dtype(config.dtype)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))

    def make(key, shape, sharding):
        fn = jax.jit(lambda k: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                     out_shardings=sharding)
        return fn(key)

    flat_shardings = treedef.flatten_up_to(shardings)
    return treedef.unflatten([make(k, s, sh) for k, s, sh in zip(keys, leaves, flat_shardings)])
