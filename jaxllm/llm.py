"""`LLM`: the offline generation API (the same shape as vLLM's)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxllm import runner
from jaxllm.checkpoint import load_config, load_params
from jaxllm.compile_cache import enable_compilation_cache
from jaxllm.config import ATTENTION_BACKENDS, ModelConfig
from jaxllm.completion import build_completion, logprob_dict
from jaxllm.kv_cache import bytes_per_page, contiguous_page_table, free_device_bytes, init_cache, pages_for
from jaxllm.ops.kv_quant import check_kv_cache_dtype
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.quantization import check_method as check_quantization, quantize_params
from jaxllm.quantized_checkpoint import checkpoint_quantization, load_quantized
from jaxllm.requests import Request, make_requests
from jaxllm.sampling import make_sampling_tensors, sampling_mode
from jaxllm.sampling_params import SamplingParams
from jaxllm.sharding import ParallelConfig, cache_sharding, check_divisible, make_mesh
from jaxllm.speculative.config import SpeculativeConfig
from models import get_model_spec

STOP_STRING_CHECK_STEPS = 16  # decode steps between host checks, only when stop strings are set
# Decode steps between the device loop's checks for "all rows done" (`runner.decode`'s check_every):
# each check is a round trip to the host that leaves the GPU idle while the next step launches.
DECODE_CHECK_EVERY = 4
_FINISH = {runner.FINISHED_LENGTH: "length", runner.FINISHED_STOP: "stop"}


# generation_config.json key -> SamplingParams field, the ones vLLM takes as a model's defaults
_GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The sampling settings a checkpoint recommends; {} without generation_config.json."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return {ours: cfg[key] for key, ours in _GENERATION_KEYS.items() if cfg.get(key) is not None}


BATCHING = ("static", "inflight")
# Token slots of one static prefill call by default: the 8B shape's gate/up activations of 16k
# tokens take 0.9 GB (a batch of 256 x 1024 tokens in one call took 14 GB and ran out of memory
# beside its KV cache on an H200).
DEFAULT_PREFILL_TOKENS = 16384

# Share of each device's allocator limit (less what is in use: the weights) that one static batch's
# KV cache may take; the rest is left to the forward's activations.
STATIC_KV_MEMORY_SHARE = 0.8

# Decode steps per host visit of LLM.generate's engine: long enough that the host's share is small
# beside the steps, short enough that a finished request's slot does not idle long.
INFLIGHT_DECODE_STEPS = 32


def _check_batching(batching) -> None:
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r} is not supported; choose one of {BATCHING}")


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resolve_max_model_len(max_model_len: int | None, config: ModelConfig) -> int:
    """The requested length, or the model's max_position_embeddings; checked against it."""
    limit = config.max_position_embeddings
    if max_model_len is None:
        return limit
    if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or not 2 <= max_model_len <= limit:
        raise ValueError(f"max_model_len must be an integer in [2, {limit}] (max_position_embeddings), "
                         f"got {max_model_len!r}")
    return max_model_len


def _quantized(params: dict, config: ModelConfig, method: str | None) -> dict:
    if method is None:
        return params
    return quantize_params(params, get_model_spec(config.architecture).model.INPUT_AXES, method)


def _in_kernel_layout(params: dict) -> dict:
    """int8 / int4 / fp4 / W8A8 weights re-laid for the K-major kernels where `ops.matmul`'s "auto"
    mode runs them (one GPU); elsewhere unchanged."""
    from jaxllm.kernel_weights import to_kernel_layout
    from jaxllm.ops.matmul import kernels_by_default

    if not kernels_by_default():
        return params

    return to_kernel_layout(params)


def _with_backend(config: ModelConfig, backend: str, tensor_parallel_size: int) -> ModelConfig:
    """The config with its attention backend; the kernels run on one device per model for now."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} not supported; choose one of {ATTENTION_BACKENDS}")
    if tensor_parallel_size > 1:
        if backend == "pallas":
            raise ValueError("attention_backend='pallas' runs on one device per model; with "
                             f"tensor_parallel_size={tensor_parallel_size} use 'auto' or 'xla'")
        backend = "xla"
    return config.replace(attention_backend=backend)


def rows_per_prefill(rows: int, prompt_len: int, max_tokens: int) -> int:
    """Rows of a `rows`-row batch (a power of two) that one prefill call takes: halved until the
    call's rows x prompt_len token slots are at most `max_tokens`, down to one row."""
    per_call = rows
    while per_call > 1 and per_call * prompt_len > max_tokens:
        per_call //= 2
    return per_call


def _rows(tree, part: slice):
    """The rows `part` of every per-row array in `tree` (scalars kept)."""
    return jax.tree.map(lambda x: x[part] if np.ndim(x) else x, tree)


def _concat_rows(parts: list[tuple], cache):
    """runner.prefill results of consecutive row slices as one: (DecodeState over `cache`, ...)."""
    if len(parts) == 1:
        return parts[0]
    states = [p[0]._replace(cache=None) for p in parts]
    joined = jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *states)
    rest = [None if p[0] is None else jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *p)
            for p in zip(*(q[1:] for q in parts))]
    return (joined._replace(cache=cache), *rest)


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n: the shapes jitted functions compile for."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


class LLM:
    """Loads a Hugging Face checkpoint once and generates from it.

    Args:
        model: a local HF directory; None uses the bundled default model.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        max_model_len: longest prompt + output; default the model's max_position_embeddings.
        tensor_parallel_size: devices to split each layer over.
        seed: seeds requests whose SamplingParams have no seed.
        skip_tokenizer_init: take token ids only (no tokenizer files needed).
        allow_pickle: load pickle `.bin` checkpoints (they can run code: only for trusted files).
        page_size: tokens per KV-cache page.
        max_num_seqs: most sequences decoded together.
        max_num_batched_tokens: most token slots (rows x padded prompt length) one static prefill
            call computes: a larger batch is prefilled in row slices, so its activations fit beside
            the KV cache (a single longer prompt still takes one call).
        layers: "unrolled" (each layer its own weights; fastest decode) or "scan" (stacked weights
            under lax.scan; compiles faster).
        kv_cache_dtype: "auto" (the model's dtype), "int8" or "fp8_e4m3" (per token and head scales).
        attention_backend: "auto" (our Pallas attention kernels on a GPU where they apply),
            "xla" (the jnp reference through XLA) or "pallas" (the kernels, or an error saying why not).
        quantization: None, or a method applied at load: "int8" (weight-only, per output channel),
            "int4" (groups of 128 inputs with zero points, round-to-nearest), "fp8" (W8A8 e4m3,
            dynamic per-token activation scales), "mxfp4" / "nvfp4" (fp4 block storage); the
            embedding table stays dense. Calibrated methods ("awq", "gptq", "smoothquant") come
            from `jaxllm quantize` checkpoints, which load as stored, as do 4-bit AWQ/GPTQ HF ones.
        batching: how `generate` batches: "static" (default: batches of `max_num_seqs` requests,
            each prefilled together and decoded in one on-device loop until all finish) or
            "inflight" (the engine: a finished request's slot goes to the next waiting one; prefill
            steps apart from decode steps, decodes `INFLIGHT_DECODE_STEPS` steps per host visit).
            Requests with prompt_logprobs, and speculative decoding, always batch statically.
        speculative_config: None, or a `SpeculativeConfig` / dict of its fields (as vLLM takes), e.g.
            {"method": "ngram", "num_speculative_tokens": 4}, {"method": "draft_model", "model": DIR}
            or {"method": "medusa", "model": HEADS_DIR}. Outputs are those of plain decoding (greedy:
            the same tokens; sampled: the same distribution); each CompletionOutput's `spec_decode`
            says how many proposals were kept.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        tokenizer: str | Path | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        skip_tokenizer_init: bool = False,
        allow_pickle: bool = False,
        page_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = DEFAULT_PREFILL_TOKENS,
        progress: bool = True,
        layers: str = "unrolled",
        kv_cache_dtype: str = "auto",
        attention_backend: str = "auto",
        quantization: str | None = None,
        speculative_config: SpeculativeConfig | dict | None = None,
        batching: str = "static",
    ):
        speculative_config = SpeculativeConfig.of(speculative_config)
        _check_batching(batching)
        self.batching = batching
        if model is None:
            from jaxllm.default_model import default_model_dir

            model = default_model_dir()
        self.model_dir = Path(model)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model directory {str(model)!r} does not exist")
        _check_positive(page_size=page_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        enable_compilation_cache()
        check_kv_cache_dtype(kv_cache_dtype)
        check_quantization(quantization, calibrated_ok=True)  # a calibrated method must be stored
        self.kv_cache_dtype = kv_cache_dtype
        self.config = _with_backend(load_config(self.model_dir, dtype), attention_backend,
                                    tensor_parallel_size)
        self.max_model_len = _resolve_max_model_len(max_model_len, self.config)
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        parallel = ParallelConfig(tensor_parallel_size)
        check_divisible(self.config, parallel)
        self.mesh = make_mesh(parallel)
        stored = checkpoint_quantization(self.model_dir)
        if stored is None:
            check_quantization(quantization)  # before reading weights: awq needs a stored checkpoint
            self.params = load_params(self.model_dir, self.config, self.mesh, allow_pickle=allow_pickle,
                                      progress=progress, layers=layers)
            self.params = _quantized(self.params, self.config, quantization)
        else:
            method = stored.get("method", stored["quant_method"])  # ours name the method; awq, gptq
            if quantization not in (None, method):
                raise ValueError(f"{self.model_dir} is already quantized with {method!r}; "
                                 f"quantization={quantization!r} cannot apply on top")
            if layers != "unrolled":
                raise ValueError(f"quantized checkpoints load with layers='unrolled', not {layers!r}")
            self.params = load_quantized(self.model_dir, self.config, self.mesh, stored)
            quantization = method
        self.params = _in_kernel_layout(self.params)
        self.quantization = quantization
        self.tokenizer = None
        if not skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.model_dir)
        self._rng = np.random.default_rng(seed)
        self._generation_defaults = generation_defaults(self.model_dir)
        self.speculator = self._speculator(speculative_config, dtype, progress)

    @classmethod
    def from_params(
        cls,
        config: ModelConfig,
        params: dict,
        mesh: Mesh,
        *,
        tokenizer=None,
        max_model_len: int | None = None,
        seed: int = 0,
        page_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = DEFAULT_PREFILL_TOKENS,
        kv_cache_dtype: str = "auto",
        attention_backend: str | None = None,
        quantization: str | None = None,
        speculative_config: SpeculativeConfig | dict | None = None,
        batching: str = "static",
    ) -> "LLM":
        """An LLM over params already on `mesh` (random weights for benchmarks, or your own)."""
        speculative_config = SpeculativeConfig.of(speculative_config)
        _check_batching(batching)
        _check_positive(page_size=page_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        check_kv_cache_dtype(kv_cache_dtype)
        enable_compilation_cache()
        config = _with_backend(config, attention_backend or config.attention_backend,
                               dict(mesh.shape).get("tensor", 1))
        check_quantization(quantization)
        llm = cls.__new__(cls)
        llm.batching = batching
        llm.quantization = quantization
        params = _in_kernel_layout(_quantized(params, config, quantization))
        llm.kv_cache_dtype = kv_cache_dtype
        llm.model_dir, llm.config, llm.params, llm.mesh, llm.tokenizer = None, config, params, mesh, tokenizer
        llm.max_model_len = _resolve_max_model_len(max_model_len, config)
        llm.page_size, llm.max_num_seqs, llm.max_num_batched_tokens = page_size, max_num_seqs, max_num_batched_tokens
        llm._rng = np.random.default_rng(seed)
        llm._generation_defaults = {}
        llm.speculator = llm._speculator(speculative_config, "auto", False)
        return llm

    def _speculator(self, spec: SpeculativeConfig | None, dtype: str, progress: bool):
        if spec is None:
            return None
        from jaxllm.speculative.speculator import Speculator

        if dict(self.mesh.shape).get("tensor", 1) > 1:
            raise ValueError("speculative decoding runs on one device per model for now; "
                             "use tensor_parallel_size=1")
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(self.params) if hasattr(x, "nbytes"))
        return Speculator(spec, self.config, self.mesh, tokenizer=self.tokenizer, dtype=dtype, progress=progress,
                          weight_bytes=weight_bytes)

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's recommended settings from generation_config.json (as vLLM)."""
        return SamplingParams(**self._generation_defaults)

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for each prompt (text, or {"prompt_token_ids": [...]}); outputs in prompt order."""
        requests = self._requests(prompts, sampling_params)
        results: dict[tuple[str, int], tuple[CompletionOutput, Any]] = {}
        with tqdm(total=len(requests), desc="generating", disable=not use_tqdm, leave=False) as bar:
            if self._inflight_applies(requests):
                results = self._generate_inflight(requests, bar)
                return self._group(requests, results, finished=True)
            size = self._static_batch_size(requests)
            for start in range(0, len(requests), size):
                batch = requests[start:start + size]
                *_, final = self._run_batch(batch)
                results.update(final)
                bar.update(len(batch))
        return self._group(requests, results, finished=True)

    def generate_stream(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        interval: int = 8,
    ) -> Iterator[list[RequestOutput]]:
        """Yields the outputs so far, in prompt order, every `interval` decode steps until all finish.

        Each yield holds every request of the current batch (of at most `max_num_seqs`); a
        request's `finished` turns True once it has stopped.
        """
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}")
        requests = self._requests(prompts, sampling_params)
        size = self._static_batch_size(requests)
        for start in range(0, len(requests), size):
            batch = requests[start:start + size]
            for results in self._run_batch(batch, interval):
                yield self._group(batch, results, finished=None)

    def _static_batch_size(self, requests: list[Request]) -> int:
        """Requests per static batch: `max_num_seqs`, or fewer where the devices report how much
        memory is free and that many rows' KV cache would not fit in STATIC_KV_MEMORY_SHARE of it."""
        free = free_device_bytes(list(self.mesh.devices.flat), STATIC_KV_MEMORY_SHARE)
        if free is None:
            return self.max_num_seqs
        row_pages = self._pages_per_row(requests, min(len(requests), self.max_num_seqs))
        per_row = row_pages * self._kv_page_bytes()
        fit = int(free // per_row) - 1  # less one row's worth for the scratch page
        if fit < 1:
            raise ValueError(
                f"the KV cache of one request of up to {row_pages * self.page_size} tokens needs "
                f"{per_row / 2**30:.2f} GiB per device, more than the {max(free, 0) / 2**30:.2f} GiB free for it: "
                f"lower max_tokens or max_model_len, or use kv_cache_dtype='fp8_e4m3' or tensor_parallel_size > 1")
        return min(self.max_num_seqs, 1 << (fit.bit_length() - 1))  # a batch of n takes bucket(n) rows

    def _kv_page_bytes(self) -> float:
        """Bytes one KV page of this LLM takes on each device (its heads split over them)."""
        return bytes_per_page(self.config, self.page_size, self.config.dtype,
                              self.kv_cache_dtype) / self.mesh.devices.size

    def _pages_per_row(self, batch: list[Request], rows: int) -> int:
        """KV pages each row of a static batch of these requests takes."""
        prompt_len = bucket(max(len(r.prompt_token_ids) for r in batch), 16)
        max_new = bucket(max(min(r.params.max_tokens, self.max_model_len - len(r.prompt_token_ids)) for r in batch), 16)
        extra = self.speculator.extra_tokens if self.speculator and self.speculator.applies(rows) else 0
        return pages_for(prompt_len + max_new + extra, self.page_size)

    def _inflight_applies(self, requests: list[Request]) -> bool:
        if self.batching != "inflight" or not requests:
            return False
        if self.speculator is not None and self.speculator.applies(min(len(requests), self.max_num_seqs)):
            return False
        return all(r.params.prompt_logprobs is None for r in requests)

    def _generate_inflight(self, requests: list[Request], bar) -> dict:
        """Every request through an engine whose page pool holds `max_num_seqs` of the longest."""
        from jaxllm.engine.engine import Engine, EngineConfig

        rows = bucket(min(len(requests), self.max_num_seqs))
        longest = max(min(len(r.prompt_token_ids) + r.params.max_tokens, self.max_model_len) for r in requests)
        prompt = bucket(max(len(r.prompt_token_ids) for r in requests), 16)
        num_pages = rows * pages_for(bucket(longest, 16), self.page_size) + 1
        free = free_device_bytes(list(self.mesh.devices.flat), STATIC_KV_MEMORY_SHARE)
        if free is not None:  # fewer pages than all rows need at once: the engine queues or preempts
            num_pages = max(2, min(num_pages, int(free // self._kv_page_bytes())))
        engine = Engine(self, EngineConfig(
            num_pages=num_pages, page_size=self.page_size,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=min(rows * prompt, self.max_num_batched_tokens),
            num_decode_steps=INFLIGHT_DECODE_STEPS, mixed_batches=False))
        for req in requests:
            engine.add(req)
        results = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id, out.outputs[0].index] = (out.outputs[0], None)
                    bar.update(1)
        return results

    def _requests(self, prompts, sampling_params) -> list[Request]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        return make_requests(
            prompts, sampling_params, tokenizer=self.tokenizer, vocab_size=self.config.vocab_size,
            max_model_len=self.max_model_len, next_seed=lambda: int(self._rng.integers(2**31)),
        )

    @staticmethod
    def _group(requests: list[Request], results, finished: bool | None) -> list[RequestOutput]:
        """One RequestOutput per prompt, its n samples together."""
        outputs = []
        for req in requests:
            if req.sample_index:
                continue
            samples = [results[req.request_id, j] for j in range(req.params.n)]
            completions = [c for c, _ in samples]
            outputs.append(RequestOutput(
                request_id=req.request_id, prompt=req.prompt, prompt_token_ids=list(req.prompt_token_ids),
                prompt_logprobs=samples[0][1], outputs=completions,
                finished=finished if finished is not None else all(c.finished() for c in completions),
            ))
        return outputs

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to one conversation or a list of them, then generates."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer, but the LLM was made with skip_tokenizer_init=True")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            ids = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=chat_template)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # -- one batch on the device ------------------------------------------------------------

    def _run_batch(self, batch: list[Request], interval: int | None = None) -> Iterator[dict]:
        """Prefills and decodes one batch; yields {(request_id, sample): (completion, prompt_logprobs)}
        after every `interval` decode steps (only at the end when None), the last one final."""
        cfg = self.config
        rows = bucket(len(batch))
        prompt_len = bucket(max(len(r.prompt_token_ids) for r in batch), 16)
        max_tokens = [min(r.params.max_tokens, self.max_model_len - len(r.prompt_token_ids)) for r in batch]
        max_new = bucket(max(max_tokens), 16)
        speculator = self.speculator if self.speculator and self.speculator.applies(len(batch)) else None
        extra = speculator.extra_tokens if speculator else 0
        pages_per_seq = self._pages_per_row(batch, len(batch))

        tokens = np.zeros((rows, prompt_len), np.int32)
        prompt_lens = np.zeros(rows, np.int32)
        for i, r in enumerate(batch):
            tokens[i, :len(r.prompt_token_ids)] = r.prompt_token_ids
            prompt_lens[i] = len(r.prompt_token_ids)
        stops = [self._stop_ids(r.params) for r in batch]
        stop_ids = np.full((rows, bucket(max(map(len, stops)))), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, :len(s)] = s
        limits = runner.Limits(stop_ids, np.array(max_tokens + [1] * (rows - len(batch)), np.int32),
                               np.int32(self.max_model_len))
        st = make_sampling_tensors([r.params for r in batch], [r.seed for r in batch], rows, cfg.vocab_size)
        # Chosen here, not on the device: a device-side choice (lax.cond) makes the host wait each step.
        mode = sampling_mode([r.params for r in batch], cfg.vocab_size)
        penalties = any(r.params.has_penalties for r in batch)
        logprobs_k = max((r.params.logprobs for r in batch if r.params.logprobs is not None), default=None)
        prompt_k = max((r.params.prompt_logprobs for r in batch if r.params.prompt_logprobs is not None),
                       default=None)

        cache = init_cache(cfg, rows * pages_per_seq + 1, self.page_size, cfg.dtype, cache_sharding(self.mesh),
                           self.kv_cache_dtype)
        page_table = contiguous_page_table(rows, pages_per_seq)
        medusa = speculator is not None and speculator.plan.method == "medusa"
        per_call = rows_per_prefill(rows, prompt_len, self.max_num_batched_tokens)
        parts = []
        for start in range(0, rows, per_call):
            part = slice(start, start + per_call)
            parts.append(runner.prefill(
                self.params, cache, tokens[part], prompt_lens[part], page_table[part], _rows(st, part),
                _rows(limits, part), config=cfg, max_new=max_new, logprobs_k=logprobs_k,
                prompt_logprobs_k=prompt_k, return_hidden=medusa, sampling_mode=mode,
            ))
            cache = parts[-1][0].cache
        state, prompt_lp, *hidden = _concat_rows(parts, cache)
        spec = None
        if speculator is not None:
            spec = speculator.start(tokens, prompt_lens, state, hidden[0] if medusa else None, page_table,
                                    rows * pages_per_seq + 1, self.page_size, cache_sharding(self.mesh),
                                    prompt_len + max_new + extra)
        steps = max(max_tokens) - 1
        check = interval is not None or any(r.params.stop for r in batch)  # look at text between slices
        interval = interval or (STOP_STRING_CHECK_STEPS if check else max(steps, 1))
        # Without text to look at, the decode call follows the prefill with no host round trip
        # between them (rows done at the prefill sit the loop out); one transfer brings back the rest.
        look = check or steps <= 0
        while True:
            last = False
            if look:
                host, spec_host, prompt_lp = jax.device_get((
                    state._replace(cache=None, prompt_mask=None, output_counts=None),
                    None if spec is None else spec._replace(history=None, draft_cache=None, hidden=None),
                    prompt_lp))
                last = steps <= 0 or bool(host.done[:len(batch)].all())
            look = True
            if check or last:
                results = {(r.request_id, r.sample_index): self._completion(i, r, host, prompt_lp, spec_host)
                           for i, r in enumerate(batch)}
                stopped = np.array([c.finish_reason is not None for c, _ in results.values()])
                last = last or bool(stopped.all())
                yield results
                if last:
                    return
                if stopped.any():  # stop strings found on the host end those rows on the device too
                    done = host.done | np.pad(stopped, (0, rows - len(batch)), constant_values=True)
                    state = state._replace(done=jax.numpy.asarray(done))
            if spec is None:
                state = runner.decode(self.params, state, st, limits, np.int32(min(interval, steps)),
                                      config=cfg, logprobs_k=logprobs_k, sampling_mode=mode,
                                      check_every=DECODE_CHECK_EVERY)
            else:
                state, spec = speculator.decode(self.params, state, spec, st, limits,
                                                np.int32(min(interval, steps)), config=cfg, logprobs_k=logprobs_k,
                                                sampling_mode=mode, penalties=penalties,
                                                check_every=DECODE_CHECK_EVERY)
            steps -= interval

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        eos = [] if params.ignore_eos else list(self.config.eos_token_ids)
        return sorted(set(eos) | set(params.stop_token_ids or ()))

    def _completion(self, i: int, req: Request, host, prompt_lp, spec=None) -> tuple[CompletionOutput, Any]:
        n = int(host.num_generated[i])
        completion = build_completion(
            self.tokenizer, req, host.tokens[i, :n], _FINISH.get(int(host.finish[i])),
            host.logprob[i], host.rank[i], host.top_ids[i], host.top_lps[i],
        )
        if spec is not None:
            completion = dataclasses.replace(completion, spec_decode=self.speculator.stats(spec, i))
        prompt_logprobs = None
        if req.params.prompt_logprobs is not None:
            k, prompt = req.params.prompt_logprobs, req.prompt_token_ids
            prompt_logprobs = [None] + [
                logprob_dict(self.tokenizer, prompt_lp.top_ids[i, t - 1, :k], prompt_lp.top_lps[i, t - 1, :k],
                             prompt[t], prompt_lp.logprob[i, t - 1], prompt_lp.rank[i, t - 1])
                for t in range(1, len(prompt))
            ]
        return completion, prompt_logprobs
