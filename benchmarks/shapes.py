"""Model shapes the benchmarks use (random weights: nothing is downloaded)."""

from jaxllm.config import ModelConfig, RopeConfig

# Physical ceilings measured on the development H200 (shared/DESIGN.md).
COPY_BANDWIDTH = 4.27e12  # bytes/s, device-to-device copy, read + write
BF16_MATMUL = 648e12  # FLOP/s, 8192^3 through XLA


def llama3_8b(dtype: str = "bfloat16", max_position_embeddings: int = 8192) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=max_position_embeddings,
        eos_token_ids=(128001,),
        dtype=dtype,
    )


def tiny() -> ModelConfig:
    """The 8B shape shrunk to run in seconds on a CPU (the benchmarks' --small smoke runs)."""
    return llama3_8b().replace(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=32)


def random_model(small: bool = False):
    """(config, mesh, params): the 8B shape (or `tiny()`) on one device with random weights, layers
    unstacked as `LLM` serves them."""
    from jaxllm.checkpoint import random_params
    from jaxllm.sharding import ParallelConfig, make_mesh
    from models.llama import unstack_layers

    config = tiny() if small else llama3_8b()
    mesh = make_mesh(ParallelConfig(1))
    return config, mesh, unstack_layers(random_params(config, mesh))
