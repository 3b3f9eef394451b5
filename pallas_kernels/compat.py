"""The few places where jax 0.10 (CI, CPU) and jax 0.11 (GPU machine) differ for our kernels."""

from __future__ import annotations

import jax


def gpu_interpret_params():
    """Parameters that run a Mosaic GPU kernel in Pallas' GPU interpret mode (on the CPU)."""
    try:  # jax 0.10 and 0.11 keep it here; there is no public alias yet
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # pragma: no cover - depends on the installed jax
        raise RuntimeError(f"jax {jax.__version__} has no Mosaic GPU interpret mode") from e
    return InterpretGPUParams()


def num_sms(default: int = 132) -> int:
    """Streaming multiprocessors of the first device (132 on an H100/H200 SXM)."""
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or default)


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def mgpu_load(ref, *, layout, optimized: bool = True):
    """`plgpu.load` of a whole (indexed) ref: jax 0.10 needs an index argument, 0.11 deprecates it."""
    import inspect

    import jax.experimental.pallas.mosaic_gpu as plgpu

    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def lane_compiler_params(**kwargs):
    """Mosaic GPU compiler parameters in Lane semantics (per-thread layouts, as in jax 0.10's default).
    jax 0.11 defaults to Warpgroup semantics, whose layout inference refuses strided shared-memory
    refs (a column of a tile), which the quantized decode kernel loads."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, **kwargs)


def gmem_ref(x):
    """`x` as a mutable array in global memory, which a kernel from `pl.kernel` updates in place (the
    buffer is aliased in and out); read it back with `freeze`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return jax.new_ref(x, memory_space=plgpu.GMEM)


def freeze(ref):
    """The value of a `gmem_ref` after the kernels that wrote it."""
    return jax.freeze(ref) if hasattr(jax, "freeze") else ref[...]
