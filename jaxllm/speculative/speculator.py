"""Host side of speculation for `LLM`: loads the draft model or Medusa heads, checks them against the
target, and starts / runs / reports the on-device speculative loop for one batch."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import runner
from jaxllm.config import ModelConfig
from jaxllm.kv_cache import AttentionMeta, KVCache, init_cache
from jaxllm.outputs import SpecDecodeStats
from jaxllm.speculative.config import SpeculativeConfig
from jaxllm.speculative.decode import Plan, SpecState, init_spec_state, spec_decode
from models import get_model_spec


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",),
                   compiler_options=runner.PREFILL_COMPILER_OPTIONS)
def _prefill_draft(params, cache: KVCache, tokens, prompt_lens, page_table, *, config: ModelConfig) -> KVCache:
    """Caches the prompts in the draft model's pages."""
    model = get_model_spec(config.architecture).model
    t = jnp.arange(tokens.shape[1])[None, :]
    positions = jnp.where(t < prompt_lens[:, None], t, -1)
    _, cache = model.forward_hidden(params, tokens, AttentionMeta(positions, page_table, prompt_lens), cache, config)
    return cache


def _same_tokenizer(a, b) -> bool:
    if a is None or b is None:
        return True  # token ids only: the vocabulary size check is all there is
    return a.get_vocab() == b.get_vocab()


# disable_by_batch_size="auto": models this large keep speculating at every batch size; smaller ones
# stop at this batch size (benchmarks/NOTES.md has the measurements behind both numbers). n-gram
# steps with no proposal skip the verify forward on models this large only (see Speculator).
AUTO_LARGE_MODEL_BYTES = 1 << 30
AUTO_SMALL_MODEL_BATCH = 8


class Speculator:
    """Everything `LLM` needs to decode a batch speculatively."""

    def __init__(self, spec: SpeculativeConfig, target: ModelConfig, mesh, *, tokenizer=None,
                 dtype: str = "auto", progress: bool = False, weight_bytes: int = 0):
        self.config = spec
        limit = spec.disable_by_batch_size
        if limit == "auto":
            limit = None if weight_bytes >= AUTO_LARGE_MODEL_BYTES else AUTO_SMALL_MODEL_BATCH
        self.disable_by_batch_size = limit
        self.draft_params = self.draft_config = self.medusa_heads = None
        if spec.method == "ngram":
            # A step with no proposal in any row runs the plain one-token forward instead of a verify:
            # that choice is a lax.cond, a host round trip each step on GPUs. On large models a verify
            # of k+1 tokens costs more than the round trip (8B, batch 1, nothing accepted: 0.71-0.79x
            # of plain decoding when always verifying, 0.99-1.00x skipping); on small, launch-bound
            # ones the round trip costs more (bundled model: 1.42-1.55x -> 1.63-1.79x always verifying).
            self.plan = Plan("ngram", spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min,
                             skip_when_empty=weight_bytes >= AUTO_LARGE_MODEL_BYTES)
        elif spec.method == "draft_model":
            self._load_draft(spec, target, mesh, tokenizer, dtype, progress)
            self.plan = Plan("draft_model", spec.num_speculative_tokens)
        else:
            self._load_medusa(spec, target)

    def _load_draft(self, spec, target, mesh, tokenizer, dtype, progress):
        from jaxllm.checkpoint import load_config, load_params

        path = Path(spec.model)
        if not path.is_dir():
            raise FileNotFoundError(f"draft model directory {spec.model!r} does not exist")
        draft = load_config(path, target.dtype if dtype == "auto" else dtype)
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"draft model {spec.model!r} has vocab_size {draft.vocab_size}, the target "
                             f"{target.vocab_size}: the draft must share the target's tokenizer")
        if tokenizer is not None and any(path.glob("tokenizer*")):
            from transformers import AutoTokenizer

            if not _same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(path)):
                raise ValueError(f"draft model {spec.model!r} has another tokenizer than the target; "
                                 "a draft must share the target's vocabulary")
        self.draft_config = draft.replace(attention_backend=target.attention_backend)
        self.draft_params = load_params(path, draft, mesh, progress=progress)

    def _load_medusa(self, spec, target):
        from jaxllm.speculative.medusa import MEDUSA_DEFAULT_CHOICES, build_tree, load_medusa_heads

        medusa_config, self.medusa_heads = load_medusa_heads(spec.model, target, allow_pickle=spec.allow_pickle)
        heads = spec.num_speculative_tokens or medusa_config.num_heads
        if heads > medusa_config.num_heads:
            raise ValueError(f"num_speculative_tokens={heads} but the Medusa checkpoint has "
                             f"{medusa_config.num_heads} heads")
        choices = spec.medusa_choices
        if choices is None:
            choices = tuple(tuple(c) for c in MEDUSA_DEFAULT_CHOICES if len(c) <= heads)
        tree = build_tree(choices, heads)  # validates
        if tree.top_k > target.vocab_size:
            raise ValueError(f"the Medusa tree takes each head's top {tree.top_k} tokens, more than the "
                             f"vocabulary of {target.vocab_size}; pass medusa_choices with smaller ranks")
        self.medusa_heads = jax.tree.map(lambda x: x[:heads], self.medusa_heads)
        self.plan = Plan("medusa", heads, tree=tuple(choices), acceptance=spec.acceptance,
                         typical_threshold=spec.typical_threshold, typical_alpha=spec.typical_alpha)

    def applies(self, batch_size: int) -> bool:
        limit = self.disable_by_batch_size
        return limit is None or batch_size < limit

    @property
    def extra_tokens(self) -> int:
        """Cache slots a row may write past its last token in one step."""
        return (len(self.plan.tree) + 1) if self.plan.method == "medusa" else self.plan.k + 1

    def start(self, tokens: np.ndarray, prompt_lens: np.ndarray, state: runner.DecodeState, hidden,
              page_table, num_pages: int, page_size: int, cache_sharding, capacity: int) -> SpecState:
        draft_cache = None
        if self.draft_config is not None:
            draft_cache = init_cache(self.draft_config, num_pages, page_size, self.draft_config.dtype, cache_sharding)
            draft_cache = _prefill_draft(self.draft_params, draft_cache, tokens, prompt_lens, page_table,
                                         config=self.draft_config)
        return init_spec_state(tokens, prompt_lens, state.tokens, capacity, self.plan.k, draft_cache, hidden)

    def decode(self, params, state, spec: SpecState, st, limits, num_steps, *, config, logprobs_k,
               sampling_mode: str = "auto", penalties: bool | None = None, check_every: int = 1):
        return spec_decode(params, state, spec, st, limits, num_steps, self.draft_params, self.medusa_heads,
                           config=config, plan=self.plan, logprobs_k=logprobs_k, draft_config=self.draft_config,
                           sampling_mode=sampling_mode, penalties=penalties, check_every=check_every)

    @staticmethod
    def stats(spec: SpecState, row: int) -> SpecDecodeStats:
        proposed = tuple(int(x) for x in spec.proposed[row])
        accepted = tuple(int(x) for x in spec.accepted[row])
        return SpecDecodeStats(int(spec.steps[row]), sum(proposed), sum(accepted), proposed, accepted)
