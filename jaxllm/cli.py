"""The `jaxllm` command line: `generate` from a checkpoint, `perplexity` of text files, `bench throughput`
and `bench latency`, `tiny-checkpoint` for docs and tests."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jaxllm
from jaxllm.config import ATTENTION_BACKENDS, DTYPES
from jaxllm.engine.engine import EngineConfig
from jaxllm.llm import LLM
from jaxllm.outputs import CompletionOutput
from jaxllm.quantization import GROUP_SIZE, METHODS as QUANTIZATION_METHODS
from jaxllm.sampling_params import SamplingParams

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
# CLI flag -> SamplingParams field; a flag left out keeps SamplingParams' default.
_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "logprobs")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump; main() turns it into exit status 2
        raise _UsageError(message)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_non_negative_int.__name__ = "non-negative integer"  # argparse names the type in its message


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxllm", description="LLM inference in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxllm {jaxllm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate completions for one or more prompts")
    gen.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                     help="a prompt; repeat the flag for several")
    for name, kind, var, what in (("max_tokens", int, "N", "most tokens to generate"),
                                  ("temperature", float, "T", "0 is greedy"),
                                  ("top_p", float, "P", "nucleus sampling mass, in (0, 1]"),
                                  ("top_k", int, "K", "keep the K most likely tokens; 0 is off"),
                                  ("min_p", float, "P", "drop tokens below P times the top probability")):
        gen.add_argument("--" + name.replace("_", "-"), type=kind, metavar=var,
                         help=f"{what} (default: {_DEFAULTS[name]})")
    gen.add_argument("--logprobs", type=int, metavar="K", help="with --json: top-K log-probabilities per token")
    gen.add_argument("--stop", nargs="+", action="extend", metavar="STR", help="stop strings")
    gen.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seeds the sampling (default: 0)")
    _add_model_args(gen, "longest prompt + output")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user message in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                     help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    gen.set_defaults(run=_generate)

    ppl = sub.add_parser("perplexity", help="perplexity of text files, with a sliding window")
    ppl.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    ppl.add_argument("--window", type=int, metavar="N",
                     help="most tokens scored at once (default: min(max model length, 1024))")
    ppl.add_argument("--stride", type=int, metavar="N", help="tokens between window starts (default: window/2)")
    ppl.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per batch (default: 8)")
    _add_model_args(ppl, "longest window")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.set_defaults(run=_perplexity)

    bench = sub.add_parser("bench", help="benchmark throughput or latency on a random or JSONL workload")
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=_Parser, required=True)
    tput = kinds.add_parser("throughput", help="submit every request at once; requests/s and tokens/s")
    tput.add_argument("--backend", choices=("engine", "llm"), default="engine",
                      help="engine: AsyncLLM (in-flight batching); llm: one LLM.generate call (default: engine)")
    _add_bench_args(tput)
    lat = kinds.add_parser("latency", help="Poisson arrivals through AsyncLLM; TTFT, TPOT and ITL percentiles")
    lat.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                     help="requests per second, arriving as a seeded Poisson process; inf: all at once (default: inf)")
    _add_bench_args(lat)

    quant = sub.add_parser("quantize", help="write a quantized checkpoint that loads without recalibrating")
    quant.add_argument("--model", help="Hugging Face checkpoint directory (default: the bundled demo model)")
    quant.add_argument("--method", required=True, choices=QUANTIZATION_METHODS,
                       help="int8: per output channel; int4: groups, round-to-nearest; awq: int4 with "
                            "activation-aware scales from --calib; gptq: int4 with GPTQ's error feedback "
                            "from --calib; fp8: W8A8 e4m3, dynamic per-token activation scales; "
                            "smoothquant: int8 W8A8 with migration strength calibrated on --calib; "
                            "mxfp4/nvfp4: fp4 (e2m1) block storage, dequantized before the product (Hopper has no fp4 "
                            "tensor cores)")
    quant.add_argument("--calib", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files (awq, gptq, smoothquant)")
    quant.add_argument("--calib-rows", type=int, default=32, metavar="N",
                       help="most calibration rows of --calib-len tokens (default: 32)")
    quant.add_argument("--calib-len", type=int, default=512, metavar="N", help="tokens a row (default: 512)")
    quant.add_argument("--group-size", type=int, default=GROUP_SIZE, metavar="G",
                       help=f"int4: inputs sharing a scale and zero point (default: {GROUP_SIZE})")
    quant.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="of the unquantized tensors")
    quant.add_argument("--out", type=Path, required=True, help="directory to write")
    quant.set_defaults(run=_quantize)

    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random-weight HF checkpoint")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--architecture", default="LlamaForCausalLM", metavar="A",
                      help="Llama/Mistral/Qwen2/Qwen3ForCausalLM (default: LlamaForCausalLM)")
    tiny.add_argument("--dtype", default="float32", choices=DTYPES)
    tiny.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="weights seed (default: 0)")
    tiny.set_defaults(run=_tiny_checkpoint)
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, longest: str) -> None:
    """The flags that say which checkpoint to load and how."""
    parser.add_argument("--model", help="Hugging Face checkpoint directory (default: the bundled default model)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: the checkpoint's own")
    parser.add_argument("--max-model-len", type=int, metavar="N",
                        help=f"{longest} (default: the model's max_position_embeddings)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="devices to split each layer over (default: 1)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load pickle .bin checkpoints (they can run code: only for files you trust)")
    parser.add_argument("--quantization", choices=QUANTIZATION_METHODS, default=None,
                        help="weight-only quantization at load (default: none)")
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                        help="auto: our Pallas kernels on GPUs where they apply (default); xla; pallas")


_BENCH_DEFAULTS = {"num_prompts": 100, "input_len": 128, "output_len": 128, "range_ratio": 0.0}
# Flags only the engine reads: an error with --backend llm rather than silently ignored.
_ENGINE_ONLY = {"num_pages": "--num-pages", "max_num_batched_tokens": "--max-num-batched-tokens",
                "gpu_memory_utilization": "--gpu-memory-utilization", "no_prefix_caching": "--no-prefix-caching",
                "num_decode_steps": "--num-decode-steps"}


def _add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Workload, engine, model and output flags shared by `bench throughput` and `bench latency`."""
    d = _BENCH_DEFAULTS
    parser.add_argument("--dataset", default="random", metavar="random|FILE.jsonl",
                        help='random token ids, or a JSONL file with "prompt" (text) or "prompt_token_ids" '
                             'and optionally "output_len" on each line (default: random)')
    parser.add_argument("--num-prompts", type=int, metavar="N",
                        help=f"requests (default: {d['num_prompts']}; with a file: all its lines, or the first N)")
    parser.add_argument("--input-len", type=int, metavar="N", help=f"random prompt length (default: {d['input_len']})")
    parser.add_argument("--output-len", type=int, metavar="N",
                        help=f"tokens each request generates, eos ignored; with a file, for lines without "
                             f"output_len (default: {d['output_len']})")
    parser.add_argument("--range-ratio", type=float, metavar="R",
                        help="random input and output lengths uniform in [len*(1-R), len*(1+R)], R in [0, 1) "
                             "(default: 0)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, metavar="S",
                        help="seeds the workload and arrivals (default: 0)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed run (same lengths, fresh tokens) that compiles before timing")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the config and every number as JSON")
    eng = EngineConfig()
    parser.add_argument("--page-size", type=int, metavar="N", help=f"tokens per KV page (default: {eng.page_size})")
    parser.add_argument("--max-num-seqs", type=int, metavar="N",
                        help=f"most sequences in one batch (default: {eng.max_num_seqs})")
    parser.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                        help=f"engine: token budget of one step (default: {eng.max_num_batched_tokens})")
    parser.add_argument("--num-pages", type=int, metavar="N",
                        help="engine: KV pages in the pool (default: sized from --gpu-memory-utilization)")
    parser.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                        help=f"engine: fraction of device memory for weights and KV pages "
                             f"(default: {eng.gpu_memory_utilization})")
    parser.add_argument("--no-prefix-caching", action="store_true", help="engine: turn prefix caching off")
    parser.add_argument("--num-decode-steps", type=int, metavar="N",
                        help=f"engine: decode steps on the device per scheduler visit when only decodes run "
                             f"(default: {eng.num_decode_steps})")
    _add_model_args(parser, "longest input + output")
    parser.set_defaults(run=_bench)


def _load_llm(args: argparse.Namespace, **kwargs) -> LLM:
    model = args.model if args.model is not None else _default_model()
    return LLM(model, dtype=args.dtype, max_model_len=args.max_model_len,
               tensor_parallel_size=args.tensor_parallel_size, progress=False, allow_pickle=args.allow_pickle,
               quantization=args.quantization, attention_backend=args.attention_backend, **kwargs)


def _quantize(args: argparse.Namespace) -> int:
    from jaxllm.calibration import awq_scales, gptq_params, smoothquant_scales
    from jaxllm.quantization import CALIBRATED, quantize_params
    from jaxllm.quantized_checkpoint import save_quantized
    from models import get_model_spec

    if args.method in CALIBRATED and not args.calib:
        raise _UsageError(f"quantize --method {args.method} needs --calib FILE [FILE ...]")
    for name in ("calib_rows", "calib_len", "group_size"):
        if getattr(args, name) < 1:
            raise _UsageError(f"quantize --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    model = Path(args.model) if args.model is not None else _default_model()
    llm = LLM(model, dtype=args.dtype, progress=True)
    axes = get_model_spec(llm.config.architecture).model.INPUT_AXES
    scales, extra = None, {}
    if args.method in CALIBRATED:
        rows = _calibration_rows(llm, args.calib, args.calib_rows, args.calib_len)
        extra = {"calibration_rows": len(rows), "calibration_tokens": sum(map(len, rows))}
    if args.method == "gptq":
        params = gptq_params(llm.params, llm.config, rows, axes, args.group_size, progress=True)
    else:
        if args.method == "awq":
            scales, report = awq_scales(llm.params, llm.config, rows, axes, args.group_size, progress=True)
            extra["mean_alpha"] = float(sum(r["alpha"] for r in report.values()) / len(report))
        if args.method == "smoothquant":
            scales, report = smoothquant_scales(llm.params, llm.config, rows, axes, progress=True)
            extra["mean_migration_strength"] = float(sum(r["alpha"] for r in report.values()) / len(report))
        params = quantize_params(llm.params, axes, args.method, group_size=args.group_size, input_scales=scales)
    out = save_quantized(params, model, args.out, args.method, args.group_size, extra)
    print(f"wrote {args.method} checkpoint to {out}" + (f" ({extra})" if extra else ""))
    return 0


def _calibration_rows(llm: LLM, files: Sequence[Path], max_rows: int, length: int) -> list[list[int]]:
    """Token rows of `length` (the last of a file may be shorter, at least 16) from the files."""
    if llm.tokenizer is None:
        raise _UsageError("quantize: calibration needs the model's tokenizer")
    rows = []
    for path in files:
        try:
            ids = llm.tokenizer.encode(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise _UsageError(f"quantize: cannot read {path}: {err}") from None
        rows += [ids[i:i + length] for i in range(0, len(ids), length) if len(ids[i:i + length]) >= 16]
    if not rows:
        raise _UsageError("quantize: the --calib files hold no row of at least 16 tokens")
    return rows[:max_rows]


def _default_model() -> Path:
    """The bundled demo model's directory, announced in one line on stderr."""
    from jaxllm.default_model import default_model_dir

    path = default_model_dir()
    print(f"jaxllm: no --model given; using the bundled demo model (a small Python code model) at {path}",
          file=sys.stderr)
    return path


def _as_json(prompt: str, c: CompletionOutput) -> str:
    record = {"prompt": prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
              "stop_reason": c.stop_reason}
    if c.logprobs is not None:
        record["cumulative_logprob"] = c.cumulative_logprob
        # Per generated token: the sampled token and the top candidates, most likely first.
        record["logprobs"] = [
            sorted(({"token_id": t, "logprob": lp.logprob, "rank": lp.rank, "text": lp.decoded_token}
                    for t, lp in step.items()), key=lambda e: e["rank"])
            for step in c.logprobs
        ]
    if c.spec_decode is not None:
        s = c.spec_decode
        record["spec_decode"] = {"num_steps": s.num_steps, "num_draft_tokens": s.num_draft_tokens,
                                 "num_accepted_tokens": s.num_accepted_tokens,
                                 "mean_accepted_length": s.mean_accepted_length,
                                 "acceptance_rate_per_position": list(s.acceptance_rate_per_position)}
    return json.dumps(record)


def _generate(args: argparse.Namespace) -> int:
    chosen = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    SamplingParams(**chosen)  # before loading the model, so bad values fail fast
    speculative = {} if args.speculative_config is None else {"speculative_config": args.speculative_config}
    llm = _load_llm(args, seed=args.seed, **speculative)
    # Flags override the model's recommended settings (generation_config.json), as in vLLM.
    params = dataclasses.replace(llm.get_default_sampling_params(), **chosen)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(args.prompt, outputs)):
        completion = out.outputs[0]
        if args.json:
            print(_as_json(prompt, completion))
        else:
            if i:
                print()
            # A completion continues its prompt; a chat reply goes on the next line.
            print(prompt + ("\n" if args.chat else "") + completion.text)
    return 0


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not text:
        raise ValueError(f"{str(path)!r} is empty")
    return text


def _perplexity(args: argparse.Namespace) -> int:
    from jaxllm import evaluate

    texts = [_read_text(path) for path in args.files]  # before loading the model, so bad files fail fast
    llm = _load_llm(args)
    names = [str(path) for path in args.files]
    ids = evaluate.tokenize(llm, texts, labels=[repr(name) for name in names])
    result = evaluate.perplexity(llm, ids, window=args.window, stride=args.stride, batch_size=args.batch_size)
    if args.json:
        files = [{"file": name, "perplexity": p, "tokens": len(x) - 1}
                 for name, p, x in zip(names, result.per_text, ids)]
        print(json.dumps({"files": files, "perplexity": result.perplexity, "nll": result.nll,
                          "tokens": result.num_tokens, "seconds": result.seconds,
                          "tokens_per_s": result.tokens_per_s}))
        return 0
    for name, p, x in zip(names, result.per_text, ids):
        print(f"{name}: perplexity {p:.4f} ({len(x) - 1} tokens)")
    print(f"total: perplexity {result.perplexity:.4f}, {result.num_tokens} tokens, "
          f"{result.tokens_per_s:.1f} tokens/s")
    return 0


def _bench_workload(args: argparse.Namespace):
    """A RandomWorkload, or the dataset's entries; checked before the model loads."""
    from jaxllm import bench

    d = _BENCH_DEFAULTS
    if args.dataset == "random":
        return bench.RandomWorkload(*(d[k] if getattr(args, k) is None else getattr(args, k)
                                      for k in ("num_prompts", "input_len", "output_len", "range_ratio")),
                                    seed=args.seed)
    for name in ("input_len", "range_ratio"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} applies to --dataset random only, not {args.dataset!r}")
    entries = bench.read_dataset(args.dataset)
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise ValueError(f"num_prompts must be an integer >= 1, got {args.num_prompts}")
        if args.num_prompts > len(entries):
            raise ValueError(f"--num-prompts {args.num_prompts} asks for more requests than the "
                             f"{len(entries)} in {args.dataset!r}")
        entries = entries[:args.num_prompts]
    return entries


def _bench(args: argparse.Namespace) -> int:
    from jaxllm import bench

    # Everything that can be checked without the model is checked first, so bad input fails fast.
    workload = _bench_workload(args)
    output_len = _BENCH_DEFAULTS["output_len"] if args.output_len is None else args.output_len
    if output_len < 1:
        raise ValueError(f"output_len must be an integer >= 1, got {output_len}")
    if isinstance(workload, bench.RandomWorkload) and args.max_model_len is not None:
        workload.check_fits(args.max_model_len)
    backend = getattr(args, "backend", "engine")
    if backend == "llm":
        given = [flag for name, flag in _ENGINE_ONLY.items() if getattr(args, name) not in (None, False)]
        if given:
            raise ValueError(f"{given[0]} applies to --backend engine only")
    if args.benchmark == "latency":
        bench.check_request_rate(args.request_rate)
    chosen = {"num_pages": args.num_pages, "page_size": args.page_size, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens,
              "gpu_memory_utilization": args.gpu_memory_utilization, "num_decode_steps": args.num_decode_steps}
    config = EngineConfig(**{k: v for k, v in chosen.items() if v is not None},
                          enable_prefix_caching=not args.no_prefix_caching)
    bench.check_engine_config(config)
    if args.json is not None and not args.json.parent.is_dir():
        raise ValueError(f"cannot write --json {str(args.json)!r}: no directory {str(args.json.parent)!r}")

    llm = _load_llm(args, page_size=config.page_size, max_num_seqs=config.max_num_seqs)
    if isinstance(workload, bench.RandomWorkload):
        requests = workload.sample(*bench.vocabulary(llm), max_model_len=llm.max_model_len)
    else:
        requests = bench.dataset_requests(workload, tokenizer=llm.tokenizer, vocab_size=llm.config.vocab_size,
                                          max_model_len=llm.max_model_len, output_len=output_len)
    def warmed(seconds: float, compiles: tuple[int, float]) -> None:  # progress, on stderr beside the table
        print(f"warm-up: {seconds:.1f} s, {compiles[0]} XLA compilations ({compiles[1]:.1f} s)", file=sys.stderr)

    if args.benchmark == "throughput":
        result = bench.run_throughput(llm, requests, backend=backend, engine_config=config, warmup=args.warmup,
                                      seed=args.seed, on_warm=warmed)
    else:
        result = bench.run_latency(llm, requests, request_rate=args.request_rate, engine_config=config,
                                   warmup=args.warmup, seed=args.seed, on_warm=warmed)
    print(bench.format_table(result))
    if args.json is not None:
        record = result.as_dict()
        engine = (dataclasses.asdict(result.engine_config) if result.engine_config is not None
                  else {"page_size": config.page_size, "max_num_seqs": config.max_num_seqs})
        settings = {"benchmark": args.benchmark, "backend": backend, "dataset": args.dataset,
                    "num_prompts": len(requests), "output_len": output_len, "seed": args.seed, "warmup": args.warmup,
                    "model": str(llm.model_dir), "dtype": llm.config.dtype, "max_model_len": llm.max_model_len,
                    "tensor_parallel_size": args.tensor_parallel_size, "engine": engine}
        if args.dataset == "random":
            settings.update(input_len=workload.input_len, range_ratio=workload.range_ratio)
        if args.benchmark == "latency":
            settings["request_rate"] = record["request_rate"]
        args.json.write_text(json.dumps({"benchmark": record.pop("benchmark"), "config": settings, **record},
                                        indent=2) + "\n")
    return 0


def _tiny_checkpoint(args: argparse.Namespace) -> int:
    from jaxllm.tiny_checkpoint import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.path, args.architecture, dtype=args.dtype, seed=args.seed))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for bad input, with a one-line message)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.run(args)
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    except (_UsageError, ValueError, OSError) as err:
        print(f"jaxllm: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
