"""KVCacheManager: page allocation, prefix reuse, LRU eviction, and a model-based state machine."""

import random

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxllm.engine import KVCacheManager, PrefixStats


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 50_000) for _ in range(n)]


def _snapshot(kv: KVCacheManager, seq_ids) -> tuple:
    return (
        kv.num_free_pages(),
        kv.usage(),
        kv.prefix_stats(),
        {s: kv.page_table(s) for s in seq_ids},
        list(kv._free),
        list(kv._evictable),
        dict(kv._hash_of_page),
    )


@pytest.mark.parametrize("seed", range(5))
def test_prefix_reuse_shares_full_pages(seed):
    rng = random.Random(seed)
    S = rng.randrange(2, 9)
    kv = KVCacheManager(32, S)
    common = _tokens(rng, 2 * S + S // 2)  # 2.5 pages
    a = common + _tokens(rng, rng.randrange(1, 2 * S))
    b = common + [a[len(common)] + 1] + _tokens(rng, rng.randrange(0, 2 * S))
    assert kv.allocate_prompt("a", a) == 0
    kv.cache_full_pages("a", a)
    assert kv.allocate_prompt("b", b) == 2 * S
    ta, tb = kv.page_table("a"), kv.page_table("b")
    assert len(tb) == -(-len(b) // S)
    assert tb[:2] == ta[:2]
    assert not set(tb[2:]) & set(ta)
    kv.check_invariants()
    assert kv.prefix_stats() == PrefixStats(queries=len(a) + len(b), hits=2 * S)


@pytest.mark.parametrize("seed", range(5))
def test_never_the_whole_prompt(seed):
    rng = random.Random(seed)
    S = rng.randrange(1, 9)
    kv = KVCacheManager(16, S)
    prompt = _tokens(rng, 2 * S)
    kv.allocate_prompt("a", prompt)
    kv.cache_full_pages("a", prompt)
    assert kv.allocate_prompt("b", prompt) == S  # last page recomputed for the last token's logits
    assert kv.allocate_prompt("c", prompt + _tokens(rng, 1)) == 2 * S
    assert kv.allocate_prompt("d", prompt[:1]) == 0
    kv.check_invariants()


def test_allocation_failure_changes_nothing():
    rng = random.Random(1)
    S = 4
    kv = KVCacheManager(5, S)  # 4 usable pages
    prompt = _tokens(rng, 2 * S + 1)
    kv.allocate_prompt("a", prompt)
    kv.cache_full_pages("a", prompt)
    kv.free("a")  # 2 evictable + 2 free
    before = _snapshot(kv, [])
    # 2 hits (evictable, so no longer available once reused) + 3 fresh pages > 2 left.
    assert kv.allocate_prompt("b", prompt[: 2 * S] + _tokens(rng, 2 * S + 1)) is None
    assert _snapshot(kv, []) == before
    assert not kv.can_allocate(5 * S)
    # 2 hits + 2 fresh pages fits exactly.
    assert kv.allocate_prompt("b", prompt[: 2 * S] + _tokens(rng, 2 * S)) == 2 * S
    assert kv.num_free_pages() == 0 and kv.usage() == 1.0
    before = _snapshot(kv, ["b"])
    assert kv.append("b", 4 * S) is True  # already covered: no change
    assert kv.append("b", 4 * S + 1) is False
    assert kv.allocate_prompt("c", _tokens(rng, 1)) is None
    assert _snapshot(kv, ["b"]) == before
    kv.check_invariants()


def test_lru_eviction_order():
    rng = random.Random(2)
    S = 3
    kv = KVCacheManager(4, S)  # 3 usable pages
    prompts = {s: _tokens(rng, S) for s in "xyz"}
    pages = {}
    for s, p in prompts.items():
        kv.allocate_prompt(s, p)
        kv.cache_full_pages(s, p)
        (pages[s],) = kv.page_table(s)
    for s in "xyz":
        kv.free(s)
    assert kv.num_free_pages() == 3 and kv.usage() == 0.0
    # Reusing y takes it off the evictable list; the fresh page evicts x (least recently freed).
    assert kv.allocate_prompt("w", prompts["y"] + _tokens(rng, 1)) == S
    assert kv.page_table("w") == [pages["y"], pages["x"]]
    assert kv.allocate_prompt("v", _tokens(rng, 1)) == 0
    assert kv.page_table("v") == [pages["z"]]
    kv.check_invariants()
    kv.free("w")
    kv.free("v")
    # x and z were evicted (their hashes dropped), y is still cached.
    assert kv.allocate_prompt("x2", prompts["x"] + [1]) == 0
    kv.free("x2")
    assert kv.allocate_prompt("y2", prompts["y"] + [1]) == S
    kv.check_invariants()


def test_free_releases_tail_pages_first():
    rng = random.Random(3)
    S = 2
    kv = KVCacheManager(3, S)  # 2 usable pages
    prompt = _tokens(rng, 2 * S)
    kv.allocate_prompt("a", prompt)
    kv.cache_full_pages("a", prompt)
    first, second = kv.page_table("a")
    kv.free("a")
    assert kv.allocate_prompt("b", _tokens(rng, 1)) == 0
    assert kv.page_table("b") == [second]  # the tail is evicted before the prefix page
    kv.free("b")  # unregistered: back to the free list
    assert kv.allocate_prompt("c", prompt[:S] + [7]) == S  # the prefix page survived
    assert kv.page_table("c") == [first, second]
    kv.check_invariants()


def test_cache_full_pages_registers_only_full_pages():
    rng = random.Random(4)
    S = 4
    kv = KVCacheManager(32, S)
    tokens = _tokens(rng, 3 * S)
    r = rng.randrange(1, S)
    kv.allocate_prompt("a", tokens[: S + r])
    kv.cache_full_pages("a", tokens[: S + r])
    assert kv.allocate_prompt("b", tokens + [5]) == S  # only the first page was full
    assert kv.append("a", 2 * S)
    kv.cache_full_pages("a", tokens[: 2 * S])
    assert kv.allocate_prompt("c", tokens + [5]) == 2 * S
    assert kv.page_table("c")[:2] == kv.page_table("a")
    with pytest.raises(ValueError, match="holds only"):
        kv.cache_full_pages("a", tokens)  # 3 pages of tokens, 2 pages held
    kv.check_invariants()


def test_duplicate_page_stays_private():
    rng = random.Random(5)
    S = 3
    kv = KVCacheManager(7, S)  # 6 usable pages
    prompt = _tokens(rng, 2 * S + 1)
    assert kv.allocate_prompt("a", prompt) == 0
    assert kv.allocate_prompt("b", prompt) == 0  # a has not cached yet: private copies
    kv.cache_full_pages("a", prompt)
    kv.cache_full_pages("b", prompt)
    tb = kv.page_table("b")
    kv.free("b")
    kv.free("a")
    assert kv.num_free_pages() == 6
    # b's pages went to the free list, so fresh allocations take them before a's cached pages.
    assert kv.allocate_prompt("c", _tokens(rng, 3 * S)) == 0
    assert sorted(kv.page_table("c")) == sorted(tb)
    assert kv.allocate_prompt("d", prompt) == 2 * S
    kv.check_invariants()


def test_bad_ids_and_arguments():
    kv = KVCacheManager(8, 4)
    kv.allocate_prompt("a", [3, 1, 4])
    with pytest.raises(ValueError, match="'a'"):
        kv.allocate_prompt("a", [2, 7])
    with pytest.raises(ValueError, match="empty"):
        kv.allocate_prompt("b", [])
    for call in (kv.free, kv.page_table, lambda s: kv.append(s, 5), lambda s: kv.cache_full_pages(s, [1])):
        with pytest.raises(ValueError, match="'nope'"):
            call("nope")
    with pytest.raises(ValueError, match="num_tokens=0"):
        kv.append("a", 0)
    with pytest.raises(ValueError, match="num_tokens=-2"):
        kv.can_allocate(-2)
    kv.free("a")
    with pytest.raises(ValueError, match="'a'"):
        kv.free("a")
    kv.check_invariants()


@pytest.mark.parametrize(
    "num_pages, page_size, bad",
    [(1, 4, "num_pages=1"), (-3, 4, "num_pages=-3"), (8, 0, "page_size=0"), (8, -2, "page_size=-2")],
)
def test_constructor_errors(num_pages, page_size, bad):
    with pytest.raises(ValueError, match=bad):
        KVCacheManager(num_pages, page_size)


@pytest.mark.parametrize("seed", range(4))
def test_usage_free_pages_and_stats(seed):
    rng = random.Random(seed)
    S = rng.randrange(1, 7)
    num_pages = rng.randrange(20, 60)
    kv = KVCacheManager(num_pages, S, enable_prefix_caching=rng.random() < 0.5)
    assert kv.num_free_pages() == num_pages - 1 and kv.usage() == 0.0
    used, queries, hits, live = 0, 0, 0, []
    for i in range(6):
        prompt = _tokens(rng, rng.randrange(1, 3 * S + 2))
        need = -(-len(prompt) // S)
        assert kv.can_allocate(len(prompt)) == (need <= num_pages - 1 - used)
        got = kv.allocate_prompt(f"s{i}", prompt)
        if got is None:
            assert need > num_pages - 1 - used
            continue
        assert got == 0  # random tokens: no shared prefixes
        live.append(f"s{i}")
        used += need
        queries += len(prompt) if kv.enable_prefix_caching else 0
        assert kv.num_free_pages() == num_pages - 1 - used
        assert kv.usage() == pytest.approx(used / (num_pages - 1))
    assert kv.prefix_stats() == PrefixStats(queries, hits)
    assert kv.prefix_stats().hit_rate == 0.0
    for s in live:
        kv.free(s)
    assert kv.num_free_pages() == num_pages - 1 and kv.usage() == 0.0
    stats = PrefixStats(queries=rng.randrange(1, 100), hits=rng.randrange(0, 50))
    assert stats.hit_rate == pytest.approx(stats.hits / stats.queries)
    assert PrefixStats(0, 0).hit_rate == 0.0


def test_prefix_caching_disabled_never_hits():
    rng = random.Random(6)
    kv = KVCacheManager(16, 2, enable_prefix_caching=False)
    prompt = _tokens(rng, 7)
    kv.allocate_prompt("a", prompt)
    kv.cache_full_pages("a", prompt)
    assert kv.allocate_prompt("b", prompt) == 0
    assert not set(kv.page_table("a")) & set(kv.page_table("b"))
    kv.free("a")
    assert kv.num_free_pages() == 15 - 4  # nothing cached: a's pages are plain free pages
    assert kv.prefix_stats() == PrefixStats(0, 0)


# --------------------------------------------------------------------------------------------------
# Model-based state machine. The model simulates the device (what each page slot holds), tracks
# each sequence's tokens and how many of them are written, and mirrors the prefix registry
# (prefix tokens -> page) and the LRU order of evictable pages.

NUM_PAGES, S = 12, 4
ALPHABET = st.sampled_from([1, 2])  # tiny alphabet so prefixes collide often


class KVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(NUM_PAGES, S)
        self.device = {p: [None] * S for p in range(NUM_PAGES)}
        self.tokens: dict[str, list[int]] = {}
        self.written: dict[str, int] = {}
        self.processed: dict[str, int] = {}  # leading full pages cache_full_pages has looked at
        self.registry: dict[tuple, int] = {}  # prefix tokens (full pages) -> page
        self.lru: list[int] = []  # evictable pages, least recently freed first
        self.next_id = 0

    # -- model helpers

    def holders(self) -> dict[int, list[tuple[str, int]]]:
        out: dict[int, list[tuple[str, int]]] = {}
        for s in self.tokens:
            for i, p in enumerate(self.kv.page_table(s)):
                out.setdefault(p, []).append((s, i))
        return out

    def model_free_and_evictable(self) -> tuple[int, int]:
        referenced = len(self.holders())
        return NUM_PAGES - 1 - referenced - len(self.lru), len(self.lru)

    def hand_out(self, fresh: list[int], free_before: int) -> None:
        """Check that fresh pages came from the free list first, then LRU evictable pages."""
        evicted = [p for p in fresh if p in self.lru]
        assert len(evicted) == max(0, len(fresh) - free_before)
        if evicted:
            event("evicted a cached page")
        assert evicted == self.lru[: len(evicted)]
        del self.lru[: len(evicted)]
        self.registry = {k: p for k, p in self.registry.items() if p not in evicted}

    def allocate(self, seq_id: str, prompt: list[int]) -> bool:
        free_before, evictable_before = self.model_free_and_evictable()
        expect_hits = 0
        max_hits = (len(prompt) - 1) // S
        while expect_hits < max_hits and tuple(prompt[: (expect_hits + 1) * S]) in self.registry:
            expect_hits += 1
        hit_pages = [self.registry[tuple(prompt[: (i + 1) * S])] for i in range(expect_hits)]
        need = -(-len(prompt) // S) - expect_hits
        fits = need <= free_before + evictable_before - sum(p in self.lru for p in hit_pages)
        before = self.kv.num_free_pages(), self.kv.prefix_stats()
        got = self.kv.allocate_prompt(seq_id, prompt)
        if not fits:
            event("allocation refused")
            assert got is None
            assert (self.kv.num_free_pages(), self.kv.prefix_stats()) == before
            return False
        assert got == expect_hits * S
        if expect_hits:
            event("prefix hit")
            if any(p in self.lru for p in hit_pages):
                event("prefix hit on an evictable page")
        table = self.kv.page_table(seq_id)
        assert table[:expect_hits] == hit_pages
        for i, p in enumerate(hit_pages):  # reused pages hold exactly this prompt's K/V
            assert self.device[p] == prompt[i * S : (i + 1) * S]
        self.lru = [p for p in self.lru if p not in hit_pages]
        self.hand_out(table[expect_hits:], free_before)
        self.tokens[seq_id] = list(prompt)
        self.written[seq_id] = got
        self.processed[seq_id] = expect_hits
        return True

    def release(self, seq_id: str) -> None:
        table = self.kv.page_table(seq_id)
        self.kv.free(seq_id)
        for m in (self.tokens, self.written, self.processed):
            del m[seq_id]
        still_held = self.holders()
        registered = set(self.registry.values())
        for p in reversed(table):
            if p not in still_held and p in registered:
                self.lru.append(p)

    def pick(self, data, pred=lambda s: True) -> str:
        return data.draw(st.sampled_from(sorted(s for s in self.tokens if pred(s))))

    # -- rules

    @precondition(lambda self: len(self.tokens) < 6)
    @rule(prompt=st.lists(ALPHABET, min_size=1, max_size=14))
    def allocate_prompt(self, prompt):
        self.next_id += 1
        self.allocate(f"s{self.next_id}", prompt)

    @precondition(lambda self: any(self.written[s] < len(t) for s, t in self.tokens.items()))
    @rule(data=st.data())
    def compute(self, data):
        """Device step: write K/V for some not-yet-written tokens."""
        s = self.pick(data, lambda s: self.written[s] < len(self.tokens[s]))
        self.write(s, data.draw(st.integers(1, len(self.tokens[s]) - self.written[s])))

    @precondition(lambda self: any(self.written[s] < len(t) for s, t in self.tokens.items()))
    @rule(data=st.data())
    def compute_all_and_cache(self, data):
        """What the scheduler does after a full prefill: write every pending token, then cache."""
        s = self.pick(data, lambda s: self.written[s] < len(self.tokens[s]))
        self.write(s, len(self.tokens[s]) - self.written[s])
        self.cache(s)

    def write(self, s: str, n: int) -> None:
        table, held = self.kv.page_table(s), self.holders()
        registered = set(self.registry.values())
        for t in range(self.written[s], self.written[s] + n):
            page = table[t // S]
            assert held[page] == [(s, t // S)], "writing into a shared page"
            assert page not in registered, "writing into a cached page"
            self.device[page][t % S] = self.tokens[s][t]
        self.written[s] += n

    @precondition(lambda self: any(self.written[s] == len(t) for s, t in self.tokens.items()))
    @rule(data=st.data(), new=st.lists(ALPHABET, min_size=1, max_size=5))
    def append(self, data, new):
        """Decode (or speculative chunk): grow the sequence by `new` tokens."""
        s = self.pick(data, lambda s: self.written[s] == len(self.tokens[s]))
        old_table = self.kv.page_table(s)
        total = len(self.tokens[s]) + len(new)
        free_before, evictable_before = self.model_free_and_evictable()
        fits = -(-total // S) - len(old_table) <= free_before + evictable_before
        assert self.kv.append(s, total) == fits
        table = self.kv.page_table(s)
        assert table[: len(old_table)] == old_table
        if fits:
            self.hand_out(table[len(old_table) :], free_before)
            self.tokens[s].extend(new)
        else:
            event("append refused")
            assert table == old_table

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def cache_full_pages(self, data):
        self.cache(self.pick(data))

    def cache(self, s: str) -> None:
        written = self.tokens[s][: self.written[s]]
        self.kv.cache_full_pages(s, written)
        table, registered = self.kv.page_table(s), set(self.registry.values())
        for i in range(self.processed[s], len(written) // S):
            key = tuple(written[: (i + 1) * S])
            if key in self.registry and self.registry[key] != table[i]:
                event("duplicate page stays private")
            if key not in self.registry and table[i] not in registered:
                self.registry[key] = table[i]
                registered.add(table[i])
        self.processed[s] = max(self.processed[s], len(written) // S)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def preempt(self, data):
        """Free, then allocate again with prompt + output (recompute)."""
        s = self.pick(data)
        tokens = self.tokens[s]
        self.release(s)
        self.allocate(s, tokens)  # may not fit: then the sequence is dropped

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def abort(self, data):
        self.release(self.pick(data))

    @precondition(lambda self: any(self.written[s] == len(t) for s, t in self.tokens.items()))
    @rule(data=st.data())
    def finish(self, data):
        self.release(self.pick(data, lambda s: self.written[s] == len(self.tokens[s])))

    # -- invariants

    @invariant()
    def consistent(self):
        self.kv.check_invariants()
        held = self.holders()
        for page, hs in held.items():
            assert page != 0
            assert self.kv._refcount[page] == len(hs)
            if len(hs) > 1:
                (index,) = {i for _, i in hs}  # shared pages sit at the same page index everywhere
                contents = {tuple(self.tokens[s][index * S : (index + 1) * S]) for s, _ in hs}
                assert len(contents) == 1 and all(self.written[s] >= (index + 1) * S for s, _ in hs)
        for s, toks in self.tokens.items():
            table = self.kv.page_table(s)
            assert len(table) == -(-len(toks) // S)
            for t in range(self.written[s]):  # what the device holds is what the sequence wrote
                assert self.device[table[t // S]][t % S] == toks[t]
        free, evictable = self.model_free_and_evictable()
        assert free >= 0
        assert self.kv.num_free_pages() == free + evictable
        assert free + evictable + len(held) == NUM_PAGES - 1
        assert self.kv.usage() == pytest.approx(len(held) / (NUM_PAGES - 1))
        assert list(self.kv._evictable) == self.lru

    def teardown(self):
        for s in list(self.tokens):
            self.release(s)
        self.kv.check_invariants()
        assert self.kv.num_free_pages() == NUM_PAGES - 1
        assert self.kv.usage() == 0.0
        assert sorted(self.kv._evictable) == sorted(set(self.registry.values()))


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
