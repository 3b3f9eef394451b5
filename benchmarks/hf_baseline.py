"""HF transformers eager generate on the same 8B shape (run in its own process: torch, not jax)."""

from __future__ import annotations

import json
import sys
import time


def run(prompt_len: int = 128, new_tokens: int = 256) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda")
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    generated = out.shape[1] - prompt_len
    return {"what": "transformers eager generate, batch 1", "torch": torch.__version__,
            "new_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


if __name__ == "__main__":
    json.dump(run(), sys.stdout)
