"""Medusa heads: against FasterDecoding's torch head, the published checkpoint layout, candidate
trees, candidates, offline acceptance, and a short self-distillation run."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jaxllm import LLM
from jaxllm.config import ModelConfig
from jaxllm.speculative import medusa
from jaxllm.speculative import medusa_training as mt
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

# In a child process: with this module (and test_speculative) added, the full suite's process crashed
# (SIGSEGV in jax 0.10.2's CPU compiler) in a later, unrelated test; see conftest.py.
pytestmark = pytest.mark.isolated_module(seconds=52)

RNG = np.random.default_rng(20260707)
D, V = 48, 96


def model_config(hidden=D, vocab=V, dtype="float32") -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                       head_dim=hidden // 4, dtype=dtype)


# FasterDecoding/Medusa's head, re-implemented from its description (medusa/model/medusa_model.py).
class ResBlock(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def torch_heads(num_heads, num_layers, shared_blocks, seed):
    """Medusa's `Sequential(*([ResBlock] * L), Linear)` shares one block per head; the unshared
    variant gives every layer its own weights. Random weights (Medusa's zero init would hide bugs)."""
    torch.manual_seed(seed)

    def blocks():
        if shared_blocks:
            return [ResBlock(D)] * num_layers
        return [ResBlock(D) for _ in range(num_layers)]

    heads = torch.nn.ModuleList(
        [torch.nn.Sequential(*blocks(), torch.nn.Linear(D, V, bias=False)) for _ in range(num_heads)])
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
    return heads


def write_published(path, heads_module, num_heads, num_layers, pickle=False, extra_config=None):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
           "base_model_name_or_path": "tiny/base", "transformers_version": "4.33.3", **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    state = heads_module.state_dict()
    if pickle:
        torch.save(state, path / "medusa_lm_head.pt")
    else:
        save_file({k: v.detach().numpy().copy() for k, v in state.items()}, path / "medusa_lm_head.safetensors")
    return path


def torch_logits(heads_module, hidden):
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(hidden, np.float32))
        return np.stack([h(x).numpy() for h in heads_module], axis=1)


@pytest.mark.parametrize("num_heads,num_layers,shared", [(3, 1, True), (2, 2, True), (2, 2, False), (2, 0, True)])
def test_published_layout_loads_and_matches_torch(tmp_path, num_heads, num_layers, shared):
    module = torch_heads(num_heads, num_layers, shared, seed=num_heads * 10 + num_layers)
    path = write_published(tmp_path / "heads", module, num_heads, num_layers)
    config, heads = medusa.load_medusa_heads(path, model_config())
    assert config == medusa.MedusaConfig(num_heads, num_layers, D, V)
    hidden = RNG.normal(size=(5, D)).astype(np.float32)
    ours = np.asarray(medusa.medusa_logits(heads, jnp.asarray(hidden)))
    want = torch_logits(module, hidden)
    assert ours.shape == (5, num_heads, V) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-4)
    other = torch_logits(torch_heads(num_heads, num_layers, shared, seed=999), hidden)
    assert not np.allclose(ours, other, atol=1e-2)  # negative control: other weights, other logits


def test_saved_heads_load_into_torch_strictly(tmp_path):
    config = medusa.MedusaConfig(3, 2, D, V)
    heads = random_heads(config)
    medusa.save_medusa_heads(tmp_path, config, heads, base_model_name_or_path="tiny/base")
    module = torch_heads(3, 2, shared_blocks=False, seed=1)
    from safetensors.torch import load_file

    module.load_state_dict(load_file(tmp_path / "medusa_lm_head.safetensors"), strict=True)
    hidden = RNG.normal(size=(4, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(medusa.medusa_logits(heads, jnp.asarray(hidden))),
                               torch_logits(module, hidden), rtol=2e-4, atol=2e-4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["medusa_num_heads"], cfg["medusa_num_layers"], cfg["base_model_name_or_path"]) == (3, 2, "tiny/base")


def random_heads(config, dtype=jnp.float32, scale=0.3):
    keys = jax.random.split(jax.random.PRNGKey(int(RNG.integers(2**31))), 3)
    return {name: (scale * jax.random.normal(k, shape)).astype(dtype)
            for k, (name, shape) in zip(keys, sorted(config.shapes().items()))}


def test_save_load_round_trip(tmp_path):
    config = medusa.MedusaConfig(4, 1, D, V)
    heads = random_heads(config)
    medusa.save_medusa_heads(tmp_path / "f32", config, heads)
    loaded_config, loaded = medusa.load_medusa_heads(tmp_path / "f32", model_config())
    assert loaded_config == config
    for name in heads:
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(heads[name]))
    # bf16 storage, loaded into a bf16 model: the values rounded once
    medusa.save_medusa_heads(tmp_path / "bf16", config, heads, dtype="bfloat16")
    _, half = medusa.load_medusa_heads(tmp_path / "bf16", model_config(dtype="bfloat16"))
    assert half["w_out"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(half["w_out"]), np.asarray(heads["w_out"].astype(jnp.bfloat16)))
    assert (tmp_path / "bf16" / "medusa_lm_head.safetensors").stat().st_size < \
        0.6 * (tmp_path / "f32" / "medusa_lm_head.safetensors").stat().st_size


def test_pickle_refused_unless_allowed(tmp_path):
    module = torch_heads(2, 1, True, seed=3)
    path = write_published(tmp_path / "pt", module, 2, 1, pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        medusa.load_medusa_heads(path, model_config())
    _, heads = medusa.load_medusa_heads(path, model_config(), allow_pickle=True)
    hidden = RNG.normal(size=(3, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(medusa.medusa_logits(heads, jnp.asarray(hidden))),
                               torch_logits(module, hidden), rtol=2e-4, atol=2e-4)


def test_more_heads_in_file_than_config_and_medusa2_prefix(tmp_path):
    module = torch_heads(3, 1, True, seed=4)
    path = write_published(tmp_path / "h", module, 2, 1)  # config names 2 of the file's 3 heads
    config, _ = medusa.load_medusa_heads(path, model_config())
    assert config.num_heads == 2
    _, all_heads = medusa.load_medusa_heads(path, model_config(), num_heads=3)
    hidden = RNG.normal(size=(3, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(medusa.medusa_logits(all_heads, jnp.asarray(hidden))),
                               torch_logits(module, hidden), rtol=2e-4, atol=2e-4)
    # Medusa-2 saves the whole model, heads under "medusa_head."
    prefixed = tmp_path / "m2"
    prefixed.mkdir()
    (prefixed / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1,
                                                      "hidden_size": D, "vocab_size": V}))
    save_file({f"medusa_head.{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()},
              prefixed / "medusa_lm_head.safetensors")
    _, from_m2 = medusa.load_medusa_heads(prefixed, model_config())
    np.testing.assert_array_equal(np.asarray(from_m2["w_out"]), np.asarray(all_heads["w_out"]))


def test_bad_checkpoints_are_named(tmp_path):
    good = torch_heads(2, 1, True, seed=5)

    def fresh(name, **kw):
        return write_published(tmp_path / name, good, 2, 1, **kw)

    with pytest.raises(ValueError, match=r"hidden size 48.*hidden_size is 64"):
        medusa.load_medusa_heads(fresh("hid"), model_config(hidden=64))
    with pytest.raises(ValueError, match=r"vocabulary of 96.*vocab_size is 100"):
        medusa.load_medusa_heads(fresh("voc"), model_config(vocab=100))
    with pytest.raises(ValueError, match=r"vocabulary of 500"):
        medusa.load_medusa_heads(fresh("cfgvoc", extra_config={"vocab_size": 500}), model_config())

    path = fresh("missing")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "medusa_num_heads": 3}))
    with pytest.raises(ValueError, match=r"missing tensor '2\.0\.linear\.weight'"):
        medusa.load_medusa_heads(path, model_config())

    path = fresh("shape")
    tensors = {k: v.detach().numpy().copy() for k, v in good.state_dict().items()}
    tensors["1.0.linear.bias"] = tensors["1.0.linear.bias"][:-1]
    save_file(tensors, path / "medusa_lm_head.safetensors")
    with pytest.raises(ValueError, match=r"'1\.0\.linear\.bias'.*shape \[47\], expected \[48\]"):
        medusa.load_medusa_heads(path, model_config())

    path = fresh("extra")
    save_file({**{k: v.detach().numpy().copy() for k, v in good.state_dict().items()},
               "lm_head.weight": np.ones((V, D), np.float32)}, path / "medusa_lm_head.safetensors")
    with pytest.raises(ValueError, match="not Medusa head weights: lm_head.weight"):
        medusa.load_medusa_heads(path, model_config())

    for key in ("medusa_num_heads", "medusa_num_layers"):
        path = fresh(f"nokey_{key}")
        cfg = json.loads((path / "config.json").read_text())
        del cfg[key]
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=f"no '{key}'"):
            medusa.load_medusa_heads(path, model_config())
    path = fresh("badval")
    (path / "config.json").write_text(json.dumps({"medusa_num_heads": 0, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="medusa_num_heads must be an integer >= 1, got 0"):
        medusa.load_medusa_heads(path, model_config())

    path = fresh("noweights")
    (path / "medusa_lm_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="medusa_lm_head.safetensors or medusa_lm_head.pt"):
        medusa.load_medusa_heads(path, model_config())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        medusa.load_medusa_heads(tmp_path / "nowhere", model_config())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1, got 0"):
        medusa.MedusaConfig(0, 1, D, V)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 0, got -1"):
        medusa.MedusaConfig(2, -1, D, V)
    config = medusa.MedusaConfig(2, 1, D, V)
    with pytest.raises(ValueError, match=r"lm_head has shape \(48, 95\)"):
        medusa.init_medusa_heads(jax.random.PRNGKey(0), config, lm_head=jnp.ones((D, V - 1)))
    with pytest.raises(ValueError, match="dtype 'int8' not supported"):
        medusa.init_medusa_heads(jax.random.PRNGKey(0), config, "int8")
    heads = random_heads(config)
    with pytest.raises(ValueError, match="hidden size 40 does not match"):
        medusa.medusa_logits(heads, jnp.ones((2, 40)))
    with pytest.raises(ValueError, match="not of the given"):
        medusa.save_medusa_heads("/tmp/unused", medusa.MedusaConfig(3, 1, D, V), heads)


def test_fresh_heads_copy_the_lm_head():
    lm_head = jnp.asarray(RNG.normal(size=(D, V)), jnp.float32)
    config = medusa.MedusaConfig(3, 2, D, V)
    heads = medusa.init_medusa_heads(jax.random.PRNGKey(1), config, lm_head=lm_head)
    hidden = jnp.asarray(RNG.normal(size=(2, 7, D)), jnp.float32)  # any leading axes
    out = medusa.medusa_logits(heads, hidden)
    assert out.shape == (2, 7, 3, V)
    for k in range(3):
        np.testing.assert_allclose(np.asarray(out[:, :, k]), np.asarray(hidden @ lm_head), rtol=1e-5, atol=1e-4)
    plain = medusa.init_medusa_heads(jax.random.PRNGKey(1), config)
    assert float(jnp.abs(plain["w_out"]).max()) <= D**-0.5 and float(jnp.std(plain["w_out"])) > 0.05


# -- trees ---------------------------------------------------------------------------------------

def test_default_tree_structure():
    tree = medusa.build_tree(medusa.MEDUSA_DEFAULT_CHOICES, 4)
    N = 64
    assert tree.num_nodes == N and tree.max_depth == 4 and tree.top_k == 10
    assert len(set(medusa.MEDUSA_DEFAULT_CHOICES)) == 63
    # order: (depth, choice), root first
    keys = [(len(c), c) for c in tree.choices]
    assert keys == sorted(keys) and sorted(tree.choices) == sorted(medusa.MEDUSA_DEFAULT_CHOICES)
    assert tree.depth[0] == 0 and tree.head[0] == -1 and tree.parent[0] == -1 and tree.rank[0] == 0
    for i, c in enumerate(tree.choices, start=1):
        assert tree.depth[i] == len(c) and tree.head[i] == len(c) - 1 and tree.rank[i] == c[-1]
        assert tree.parent[i] == (0 if len(c) == 1 else tree.choices.index(c[:-1]) + 1)
        assert tree.parent[i] < i
    # ancestor mask from the definition: node j's path is a prefix of node i's path
    paths = [()] + list(tree.choices)
    want = np.array([[paths[i][:len(paths[j])] == paths[j] for j in range(N)] for i in range(N)])
    np.testing.assert_array_equal(tree.ancestor_mask, want)
    np.testing.assert_array_equal(tree.ancestor_mask.sum(1), tree.depth + 1)
    # paths: one per leaf, each a parent chain from the root, padded with -1
    leaves = {i for i in range(N) if i not in set(tree.parent.tolist())}
    assert tree.paths.shape == (len(leaves), 5)
    assert {int(p[p >= 0][-1]) for p in tree.paths} == leaves
    for p in tree.paths:
        nodes = p[p >= 0]
        assert nodes[0] == 0 and np.all(p[len(nodes):] == -1)
        assert all(tree.parent[b] == a for a, b in itertools.pairwise(nodes))
    assert np.all(tree.ancestor_mask[tree.paths[:, -1][tree.paths[:, -1] >= 0]].sum(1) == 5)


def test_small_tree_by_hand():
    tree = medusa.build_tree([[1, 0], [0], [0, 1], [1], [0, 0]], num_heads=2)
    # sorted: root, (0,), (1,), (0,0), (0,1), (1,0)
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0))
    np.testing.assert_array_equal(tree.depth, [0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(tree.head, [-1, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(tree.rank, [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(tree.parent, [-1, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(tree.paths, [[0, 1, 3], [0, 1, 4], [0, 2, 5]])
    np.testing.assert_array_equal(tree.ancestor_mask.astype(int), [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ])
    root_only = medusa.build_tree([], 1)
    assert root_only.num_nodes == 1 and root_only.paths.tolist() == [[0]]


def test_truncated_default_tree():
    for K in (1, 2, 3):
        choices = medusa.truncate_choices(medusa.MEDUSA_DEFAULT_CHOICES, K)
        assert choices and all(len(c) <= K for c in choices)
        assert len(choices) == sum(len(c) <= K for c in medusa.MEDUSA_DEFAULT_CHOICES)
        tree = medusa.default_tree(K)
        assert tree.max_depth == K and tree.num_nodes == len(choices) + 1
    assert medusa.default_tree(3).num_nodes == 62 and medusa.default_tree(1).num_nodes == 11
    assert medusa.default_tree(5).num_nodes == 64
    with pytest.raises(ValueError, match="deeper than the 3 Medusa heads"):
        medusa.build_tree(medusa.MEDUSA_DEFAULT_CHOICES, 3)


@pytest.mark.parametrize("choices,num_heads,message", [
    ([[0], [0, 0, 1]], 3, r"prefix \[0, 0\]"),
    ([[1, 0]], 2, r"prefix \[1\]"),
    ([[0], [0, 0]], 1, "deeper than the 1 Medusa heads"),
    ([[0], [-1]], 2, "ranks must be integers >= 0"),
    ([[0], [0]], 2, "appears twice"),
    ([[0], []], 2, "non-empty list of ranks"),
    ([[0], [0.5]], 2, "ranks must be integers"),
    ("01", 2, "choices must be a list"),
    ([[0]], 0, "num_heads must be a positive integer"),
])
def test_bad_trees_are_named(choices, num_heads, message):
    with pytest.raises(ValueError, match=message):
        medusa.build_tree(choices, num_heads)


def test_tree_candidates_match_argsort():
    tree = medusa.default_tree(3)
    B, K, Vb = 4, 3, 50
    logits = RNG.normal(size=(B, K, Vb)).astype(np.float32)
    base = RNG.integers(0, Vb, size=B).astype(np.int32)
    got = np.asarray(jax.jit(medusa.tree_candidates, static_argnums=2)(jnp.asarray(base), jnp.asarray(logits), tree))
    order = np.argsort(-logits, axis=-1, kind="stable")
    assert got.shape == (B, tree.num_nodes) and got.dtype == np.int32
    np.testing.assert_array_equal(got[:, 0], base)
    for i in range(1, tree.num_nodes):
        np.testing.assert_array_equal(got[:, i], order[:, tree.head[i], tree.rank[i]])
    # negative control: the candidates depend on the logits
    assert not np.array_equal(got, np.asarray(medusa.tree_candidates(jnp.asarray(base), jnp.asarray(-logits), tree)))
    with pytest.raises(ValueError, match="only 2 heads"):
        medusa.tree_candidates(jnp.asarray(base), jnp.asarray(logits[:, :2]), tree)
    with pytest.raises(ValueError, match="more than the vocabulary of 5"):
        medusa.tree_candidates(jnp.asarray(base), jnp.asarray(logits[:, :, :5]), tree)


# -- offline acceptance and training -------------------------------------------------------------

def test_accepted_lengths_match_brute_force():
    tree = medusa.default_tree(3)
    # ranks mostly small so that long paths occur
    ranks = np.minimum(RNG.geometric(0.5, size=(3000, 3)) - 1, 12)
    got = mt.accepted_lengths(ranks, tree)
    want = []
    for r in ranks:
        best = 0
        for path in tree.paths:
            nodes = path[path > 0]
            matched = 0
            for d, node in enumerate(nodes):
                if tree.rank[node] != r[d]:
                    break
                matched = d + 1
            best = max(best, matched)
        want.append(1 + best)
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(got)) == {1, 2, 3, 4}


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("medusa") / "llama", hidden_size=64,
                                 num_layers=2, seed=int(RNG.integers(1, 2**31)))
    return LLM(path, dtype="float32", max_model_len=64, max_num_seqs=32, progress=False)


def test_self_distillation_learns(tiny_llm):
    vocab = tiny_llm.config.vocab_size
    docs = [RNG.integers(3, vocab, size=int(n)).astype(np.int32) for n in RNG.integers(40, 120, size=12)]
    prompts = mt.cut_prompts(docs, 32, 16, seed=1)
    assert all(len(p) == 16 for p in prompts)
    continuations = mt.generate_continuations(tiny_llm, prompts, 24, temperature=0.0, seed=0, use_tqdm=False)
    data = mt.build_distill_data(tiny_llm, prompts, continuations)
    assert data.hidden.shape == (32, 40, 64)
    # the stored hidden states give the base model's own greedy tokens back
    lm_head = mt.lm_head_matrix(tiny_llm.params)
    row = 0
    greedy = np.argmax(np.asarray(data.hidden[row] @ np.asarray(lm_head)), axis=-1)
    P, L = data.prompt_lens[row], data.lengths[row]
    assert np.mean(greedy[P - 1:L - 1] == data.tokens[row, P:L]) > 0.9

    config = medusa.MedusaConfig(2, 1, 64, vocab)
    heads = medusa.init_medusa_heads(jax.random.PRNGKey(0), config, "float32", lm_head=lm_head)
    ranks0, valid = mt.target_ranks(heads, data)
    trained, curve = mt.train_heads(heads, lm_head, data, mt.TrainConfig(steps=40, batch_rows=8, lr=1e-2, warmup=4),
                                    progress=False, log_every=10)
    losses = [c["loss"] for c in curve]
    assert losses[-1] < 0.7 * losses[0], losses
    ranks1, valid1 = mt.target_ranks(trained, data)
    np.testing.assert_array_equal(valid, valid1)
    acc0, acc1 = mt.topk_accuracy(ranks0, valid, (1,)), mt.topk_accuracy(ranks1, valid, (1,))
    assert acc1["top1"][0] > acc0["top1"][0] + 0.1, (acc0, acc1)
    # ranks against a direct computation for one row and head
    logits = np.asarray(medusa.medusa_logits(trained, jnp.asarray(data.hidden[row])))[:, 1]  # head 1: t + 3
    t = np.flatnonzero(valid[row, :, 1])
    want = [(logits[i] > logits[i, data.tokens[row, i + 3]]).sum() for i in t]
    np.testing.assert_array_equal(ranks1[row, t, 1], want)
    tree = medusa.default_tree(2)
    mean_len = mt.accepted_lengths(mt.tree_positions(ranks1, valid, 2), tree).mean()
    assert mean_len > mt.accepted_lengths(mt.tree_positions(ranks0, valid, 2), tree).mean()


def test_training_inputs_are_checked(tiny_llm):
    with pytest.raises(ValueError, match="no document is longer than the prompt length 50"):
        mt.cut_prompts([np.arange(10)], 2, 50, seed=0)
    with pytest.raises(ValueError, match="warmup must be an integer in"):
        mt.TrainConfig(steps=5, warmup=5)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        mt.TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="as many continuations as prompts"):
        mt.build_distill_data(tiny_llm, [[1, 2]], [])


def test_train_script_writes_loadable_heads(tmp_path):
    import importlib.util
    from pathlib import Path

    from jaxllm.default_model import default_model_dir

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_medusa.py"
    spec = importlib.util.spec_from_file_location("train_medusa", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "heads"
    summary = module.main(["--out", str(out), "--num-heads", "2", "--steps", "3", "--warmup", "1",
                           "--batch-rows", "2", "--num-prompts", "4", "--eval-prompts", "2", "--prompt-len", "16",
                           "--gen-len", "8", "--max-files", "30", "--no-progress"])
    llm_config = LLM(progress=False, skip_tokenizer_init=True).config
    config, heads = medusa.load_medusa_heads(out, llm_config)
    assert config == medusa.MedusaConfig(2, 1, llm_config.hidden_size, llm_config.vocab_size)
    assert heads["w_out"].dtype == jnp.bfloat16
    saved = json.loads((out / "training.json").read_text())
    assert saved["heldout"] == summary["heldout"] and len(saved["heldout"]["head_top1"]) == 2
    assert saved["curve"][-1]["step"] == 3
    # the base model's held-out files are the held-out set, and never trained on
    stdlib = Path(saved["python_stdlib"])
    train, heldout = module.corpus_files(stdlib, 5, None, default_model_dir())
    listed = set(json.loads((default_model_dir() / "training.json").read_text())["heldout_files"])
    names = lambda files: {f.relative_to(stdlib).as_posix() for f in files}
    assert names(heldout) <= listed and len(heldout) >= len(listed) - 5
    assert not names(train) & listed and len(train) > 100
    assert set(saved["heldout_file_names"]) == names(heldout)
