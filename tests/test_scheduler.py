"""Tests for the in-flight batching scheduler, driven by a fake device that checks the page tables."""

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.engine.kv_cache_manager import KVCacheManager
from jaxllm.engine.scheduler import Scheduler, ScheduledSeq, Sequence, Status


def _pages(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def sample_token(request_id: str, length: int) -> int:
    """The fake model's next token: a deterministic function of the request and its length."""
    return zlib.crc32(f"{request_id}/{length}".encode()) % 1000


class FakeDevice:
    """Stands in for the model on a paged KV cache.

    Writing position t stores the token prefix [0, t] into its page slot (K/V depends on every earlier
    token), and every step reads all earlier positions back through the page table, so a wrong page
    table, a page overwritten while still in use, or a bad prefix reuse shows up as a mismatch.
    """

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def _slot(self, table: list[int], t: int) -> tuple[int, int]:
        page = table[t // self.kv.page_size]
        assert page != 0, "scratch page 0 in a page table"
        return page, t % self.kv.page_size

    def run(self, scheduled, seqs: dict[str, Sequence]) -> dict[str, int | None]:
        sampled = {}
        for s in scheduled:
            seq = seqs[s.request_id]
            ids, table = seq.all_token_ids, self.kv.page_table(s.request_id)
            for t in range(s.start):
                assert self.slots.get(self._slot(table, t)) == tuple(ids[: t + 1]), (s, t)
            for t in range(s.start, s.start + s.num_tokens):
                self.slots[self._slot(table, t)] = tuple(ids[: t + 1])
            done = s.start + s.num_tokens == seq.num_tokens
            sampled[s.request_id] = sample_token(s.request_id, seq.num_tokens) if done else None
        return sampled


def make(num_pages, page_size, *, max_num_seqs=8, budget=64, max_model_len=256, prefix=True):
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=prefix)
    sched = Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
    return kv, sched


def simulate(requests, *, num_pages, page_size, max_num_seqs, budget, max_model_len, prefix=True):
    """Run (request_id, prompt, max_tokens, arrival_step) requests to completion; check every step."""
    kv, sched = make(num_pages, page_size, max_num_seqs=max_num_seqs, budget=budget,
                     max_model_len=max_model_len, prefix=prefix)
    device, seqs, outputs = FakeDevice(kv), {}, []
    arrivals = sorted(requests, key=lambda r: r[3])
    total = sum(len(p) + m for _, p, m, _ in requests)
    max_steps = 4 * total * (len(requests) + 1) + max(r[3] for r in requests) + 1
    step = 0
    while arrivals or sched.has_unfinished():
        assert step < max_steps, f"no progress after {step} steps"
        while arrivals and arrivals[0][3] <= step:
            rid, prompt, max_tokens, _ = arrivals.pop(0)
            seqs[rid] = Sequence(rid, list(prompt), max_tokens)
            sched.add(seqs[rid])
        out = sched.schedule()
        check_output(out, sched, seqs)
        if sched.has_unfinished():
            assert out.scheduled, "unfinished sequences but nothing scheduled: deadlock"
        sched.update(device.run(out.scheduled, seqs))
        kv.check_invariants()
        outputs.append(out)
        step += 1
    return seqs, kv, outputs


def check_output(out, sched, seqs):
    ids = [s.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids)) <= sched.max_num_seqs
    assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled) <= sched.max_num_batched_tokens
    for s in out.scheduled:
        seq = seqs[s.request_id]
        assert seq.status is Status.RUNNING
        assert s.start == seq.num_computed_tokens
        assert 1 <= s.num_tokens and s.start + s.num_tokens <= seq.num_tokens
    for rid in out.preempted:
        assert seqs[rid].status is Status.WAITING and seqs[rid].num_computed_tokens == 0


def run_alone(rid, prompt, max_tokens, page_size, max_model_len):
    seqs, _, _ = simulate([(rid, prompt, max_tokens, 0)], num_pages=1000, page_size=page_size,
                          max_num_seqs=1, budget=1000, max_model_len=max_model_len)
    return seqs[rid].output_token_ids


def step(sched, seqs, device):
    out = sched.schedule()
    finished = sched.update(device.run(out.scheduled, seqs))
    return out, finished


def add_all(sched, *specs):
    seqs = {}
    for rid, prompt, max_tokens in specs:
        seqs[rid] = Sequence(rid, list(prompt), max_tokens)
        sched.add(seqs[rid])
    return seqs


# ----------------------------------------------------------------------------- budget and order


def test_budget_and_max_num_seqs_respected_on_random_workloads():
    rng = random.Random(1234)
    saw_full_budget = saw_full_seqs = False
    for _ in range(25):
        page_size, budget, max_num_seqs = rng.randint(1, 8), rng.randint(1, 40), rng.randint(1, 6)
        requests = [(f"r{i}", [rng.randrange(50) for _ in range(rng.randint(1, 30))], rng.randint(1, 12),
                     rng.randint(0, 10)) for i in range(rng.randint(1, 10))]
        num_pages = max(_pages(len(p) + m, page_size) for _, p, m, _ in requests) + 1 + rng.randint(0, 8)
        _, _, outputs = simulate(requests, num_pages=num_pages, page_size=page_size, max_num_seqs=max_num_seqs,
                                 budget=budget, max_model_len=64)
        # simulate() asserts the limits every step; check they were actually reached sometimes.
        saw_full_budget |= any(o.num_batched_tokens == budget for o in outputs)
        saw_full_seqs |= any(len(o.scheduled) == max_num_seqs > 1 for o in outputs)
    assert saw_full_budget and saw_full_seqs


def test_chunked_prefill_then_decode():
    rng = random.Random(7)
    kv, sched = make(40, 16, budget=32)
    seqs = add_all(sched, ("a", [rng.randrange(100) for _ in range(100)], 3))
    device, chunks, num_out = FakeDevice(kv), [], []
    while sched.has_unfinished():
        out, _ = step(sched, seqs, device)
        chunks += [(s.start, s.num_tokens) for s in out.scheduled]
        num_out.append(len(seqs["a"].output_token_ids))
    assert chunks == [(0, 32), (32, 32), (64, 32), (96, 4), (100, 1), (101, 1)]
    assert num_out == [0, 0, 0, 1, 2, 3]
    assert seqs["a"].status is Status.FINISHED_LENGTH
    assert seqs["a"].output_token_ids == [sample_token("a", n) for n in (100, 101, 102)]


def test_decodes_are_scheduled_before_new_prefills():
    rng = random.Random(3)
    kv, sched = make(40, 4, budget=8)
    seqs = add_all(sched, ("a", [rng.randrange(9) for _ in range(5)], 10))
    device = FakeDevice(kv)
    step(sched, seqs, device)
    seqs |= add_all(sched, ("b", [rng.randrange(9) for _ in range(20)], 4))
    out, _ = step(sched, seqs, device)
    assert out.scheduled == (ScheduledSeq("a", 5, 1), ScheduledSeq("b", 0, 7))
    out, _ = step(sched, seqs, device)  # b's prefill continues after a's decode
    assert out.scheduled == (ScheduledSeq("a", 6, 1), ScheduledSeq("b", 7, 7))


def test_fcfs_big_waiting_head_blocks_later_small_ones():
    rng = random.Random(5)
    kv, sched = make(5, 4)  # 4 usable pages
    seqs = add_all(sched, ("a", [rng.randrange(9) for _ in range(10)], 2))  # 3 pages
    device = FakeDevice(kv)
    step(sched, seqs, device)
    seqs |= add_all(sched, ("big", [rng.randrange(9) for _ in range(8)], 2), ("small", [rng.randrange(9)] * 2, 2))
    assert kv.can_allocate(2) and not kv.can_allocate(8)  # small alone would fit, big does not
    out, finished = step(sched, seqs, device)
    assert [s.request_id for s in out.scheduled] == ["a"] and finished == [seqs["a"]]
    assert sched.num_waiting() == 2 and seqs["small"].status is Status.WAITING
    out, _ = step(sched, seqs, device)
    assert [s.request_id for s in out.scheduled] == ["big", "small"]


def test_prefix_reuse_starts_after_cached_pages():
    rng = random.Random(11)
    S = 4
    prefix = [rng.randrange(1, 50) for _ in range(2 * S)]
    kv, sched = make(30, S)
    seqs = add_all(sched, ("a", prefix + [rng.randrange(50) for _ in range(3)], 5))
    device = FakeDevice(kv)
    step(sched, seqs, device)
    seqs |= add_all(sched, ("b", prefix + [rng.randrange(50) for _ in range(5)], 5),
                    ("c", [0] + prefix[1:] + [rng.randrange(50) for _ in range(5)], 5))
    out, _ = step(sched, seqs, device)
    assert out.scheduled[1:] == (ScheduledSeq("b", 2 * S, 5), ScheduledSeq("c", 0, 2 * S + 5))
    assert seqs["b"].num_computed_tokens == 2 * S + 5
    assert kv.page_table("b")[:2] == kv.page_table("a")[:2]
    assert kv.prefix_stats().hits == 2 * S
    while sched.has_unfinished():
        step(sched, seqs, device)
    for rid, seq in seqs.items():
        assert seq.output_token_ids == run_alone(rid, seq.prompt_token_ids, 5, S, 256)


# ----------------------------------------------------------------------------- preemption


@pytest.mark.parametrize("prefix", [False, True])
def test_preemption_of_newest_and_recompute(prefix):
    rng = random.Random(17)
    S = 4
    kv, sched = make(5, S, prefix=prefix)  # 4 usable pages
    prompts = {rid: [rng.randrange(9) for _ in range(6)] for rid in "ab"}
    seqs = add_all(sched, *[(rid, p, 8) for rid, p in prompts.items()])
    device = FakeDevice(kv)
    for _ in range(3):  # prefill both, then two decodes: positions 0..7 fill each one's 2 pages
        out, _ = step(sched, seqs, device)
        assert not out.preempted
    seqs |= add_all(sched, ("c", [rng.randrange(9)], 2))  # waits: pool full
    out, _ = step(sched, seqs, device)  # a needs a 3rd page: b (newest) is preempted
    b = seqs["b"]
    assert out.preempted == ("b",) and out.scheduled == (ScheduledSeq("a", 8, 1),)
    assert (b.status, b.num_computed_tokens, b.num_preemptions, len(b.output_token_ids)) == (
        Status.WAITING, 0, 1, 3)
    assert kv.num_free_pages() == 4 - 3  # b's 2 pages freed, a took one
    with pytest.raises(ValueError, match="'b'"):
        kv.page_table("b")
    while seqs["a"].status is Status.RUNNING:
        out, _ = step(sched, seqs, device)
        assert [s.request_id for s in out.scheduled] == ["a"]  # b at the head blocks c
    out, _ = step(sched, seqs, device)
    assert [s.request_id for s in out.scheduled] == ["b", "c"]
    rb = out.scheduled[0]
    assert rb.start + rb.num_tokens == 6 + 3 and rb.start % S == 0  # prompt + 3 outputs recomputed
    if not prefix:
        assert rb.start == 0
    while sched.has_unfinished():
        step(sched, seqs, device)
    for rid, seq in seqs.items():
        assert seq.output_token_ids == run_alone(rid, seq.prompt_token_ids, seq.max_tokens, S, 256)
    kv.check_invariants()
    assert kv.num_free_pages() == kv.num_pages - 1


def test_sequence_alone_stops_at_pool_capacity():
    rng = random.Random(23)
    S = 4
    kv, sched = make(3, S)  # 2 usable pages: 8 tokens of K/V at most
    seqs = add_all(sched, ("a", [rng.randrange(9) for _ in range(3)], 50))
    device = FakeDevice(kv)
    while sched.has_unfinished():
        out, _ = step(sched, seqs, device)
        assert not out.preempted
    assert seqs["a"].status is Status.FINISHED_LENGTH
    assert seqs["a"].num_tokens == 2 * S + 1  # the last sampled token is never computed
    assert kv.num_free_pages() == 2


@st.composite
def workloads(draw):
    page_size = draw(st.integers(1, 5))
    base = draw(st.lists(st.integers(0, 2), min_size=12, max_size=12))  # shared prefixes are common
    requests = []
    for i in range(draw(st.integers(1, 7))):
        shared = draw(st.integers(0, 12))
        tail = draw(st.lists(st.integers(0, 2), min_size=0 if shared else 1, max_size=10))
        requests.append((f"r{i}", base[:shared] + tail, draw(st.integers(1, 10)), draw(st.integers(0, 6))))
    longest = max(len(p) for _, p, _, _ in requests)
    max_model_len = draw(st.integers(longest + 1, 32))
    # Smallest pool that holds any one request for its whole life (prompt + 1 to be admitted).
    need = max(max(_pages(min(len(p) + m, max_model_len) - 1, page_size), _pages(len(p) + 1, page_size))
               for _, p, m, _ in requests)
    huge = draw(st.integers(0, 2)) == 2  # mostly tiny pools, which force preemptions
    usable = 300 if huge else need + draw(st.integers(0, 2))
    return dict(requests=requests, num_pages=usable + 1, page_size=page_size, max_model_len=max_model_len,
                max_num_seqs=draw(st.integers(1, 5)), budget=draw(st.integers(1, 24)), prefix=draw(st.booleans()))


@settings(max_examples=50, deadline=None)
@given(workloads())
def test_simulation_outputs_match_running_alone(w):
    seqs, kv, _ = simulate(**w)
    for rid, prompt, max_tokens, _ in w["requests"]:
        seq = seqs[rid]
        assert seq.status is Status.FINISHED_LENGTH
        assert len(seq.output_token_ids) == min(max_tokens, w["max_model_len"] - len(prompt))
        assert seq.output_token_ids == run_alone(rid, prompt, max_tokens, w["page_size"], w["max_model_len"])
    kv.check_invariants()
    assert kv.num_free_pages() == w["num_pages"] - 1


def test_simulation_with_tiny_pool_preempts_and_still_matches():
    rng = random.Random(29)
    S = 2
    requests = [(f"r{i}", [rng.randrange(3) for _ in range(rng.randint(1, 8))], rng.randint(4, 10), i % 3)
                for i in range(6)]
    need = max(_pages(len(p) + m - 1, S) for _, p, m, _ in requests)
    seqs, kv, outputs = simulate(requests, num_pages=need + 2, page_size=S, max_num_seqs=4, budget=16,
                                 max_model_len=64)
    assert sum(len(o.preempted) for o in outputs) >= 3
    assert sum(seq.num_preemptions for seq in seqs.values()) == sum(len(o.preempted) for o in outputs)
    for rid, prompt, max_tokens, _ in requests:
        assert seqs[rid].output_token_ids == run_alone(rid, prompt, max_tokens, S, 64)
    assert kv.num_free_pages() == kv.num_pages - 1


# ----------------------------------------------------------------------------- abort and finish


@pytest.mark.parametrize("decode_steps", [0, 2])
def test_abort_mid_prefill_and_mid_decode_frees_pages(decode_steps):
    rng = random.Random(31 + decode_steps)
    kv, sched = make(40, 4, budget=32, prefix=False)
    seqs = add_all(sched, ("a", [rng.randrange(50) for _ in range(70)], 9),
                   ("b", [rng.randrange(50) for _ in range(10)], 9))
    device = FakeDevice(kv)
    for _ in range(1 if decode_steps == 0 else 3 + decode_steps):
        step(sched, seqs, device)
    a = seqs["a"]
    assert a.status is Status.RUNNING and (a.output_token_ids == []) == (decode_steps == 0)
    free_before, held = kv.num_free_pages(), len(kv.page_table("a"))
    sched.abort("a")
    assert a.status is Status.FINISHED_ABORTED and kv.num_free_pages() == free_before + held
    kv.check_invariants()
    # Aborted between schedule() and update(): update skips it.
    out = sched.schedule()
    sampled = device.run(out.scheduled, seqs)
    sched.abort("b")
    assert "b" in sampled and sched.update(sampled) == []
    assert not sched.has_unfinished() and kv.num_free_pages() == kv.num_pages - 1
    kv.check_invariants()


def test_finish_by_caller_frees_pages_and_rejects_bad_status():
    kv, sched = make(20, 4, max_num_seqs=1)
    seqs = add_all(sched, ("a", [3, 1, 4, 1, 5], 9), ("w", [2, 7], 9))
    step(sched, seqs, FakeDevice(kv))
    with pytest.raises(ValueError, match="RUNNING"):
        sched.finish("a", Status.RUNNING)
    sched.finish("a", Status.FINISHED_STOPPED)
    assert seqs["a"].status is Status.FINISHED_STOPPED and (sched.num_running(), sched.num_waiting()) == (0, 1)
    sched.finish("w", Status.FINISHED_STOPPED)
    assert not sched.has_unfinished() and kv.num_free_pages() == 19


# ----------------------------------------------------------------------------- errors


def test_add_errors_name_the_values():
    kv, sched = make(4, 4, max_model_len=16)  # 3 usable pages: 12 tokens
    sched.add(Sequence("a", [1, 2], 3))
    with pytest.raises(ValueError, match="'a'"):
        sched.add(Sequence("a", [5], 3))
    with pytest.raises(ValueError, match="empty"):
        sched.add(Sequence("e", [], 3))
    with pytest.raises(ValueError, match="max_tokens.*0"):
        sched.add(Sequence("m", [1], 0))
    big = make(100, 4, max_model_len=16)[1]
    big.add(Sequence("ok", list(range(15)), 3))
    with pytest.raises(ValueError, match="16 tokens.*max_model_len=16"):
        big.add(Sequence("long", list(range(16)), 3))
    sched.add(Sequence("fits", list(range(11)), 3))
    with pytest.raises(ValueError, match="12 tokens.*4 pages.*only 3"):
        sched.add(Sequence("huge", list(range(12)), 3))
    with pytest.raises(ValueError, match="'nope'"):
        sched.abort("nope")
    assert sched.num_waiting() == 2


def test_update_errors():
    kv, sched = make(20, 4)
    seqs = add_all(sched, ("a", [1, 2, 3], 4))
    out = sched.schedule()
    with pytest.raises(ValueError, match="'zzz'"):
        sched.update({"a": 5, "zzz": 1})
    with pytest.raises(ValueError, match="'a'.*None"):
        sched.update({"a": None})
    assert seqs["a"].num_computed_tokens == 0  # a rejected update changes nothing
    sched.update(FakeDevice(kv).run(out.scheduled, seqs))
    assert seqs["a"].num_computed_tokens == 3 and len(seqs["a"].output_token_ids) == 1


@pytest.mark.parametrize("kwargs", [dict(max_num_seqs=0), dict(max_num_batched_tokens=-1), dict(max_model_len=1),
                                    dict(max_num_seqs=2.5)])
def test_init_errors(kwargs):
    args = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32) | kwargs
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=f"{name}={value}"):
        Scheduler(KVCacheManager(8, 4), **args)


def _decoding(sched, kv, prompts: dict[str, int], max_tokens: int = 50):
    """Sequences prefilled (one step) and in their decode phase, with the decode step scheduled."""
    for rid, n in prompts.items():
        sched.add(Sequence(rid, list(range(1, n + 1)), max_tokens))
    out = sched.schedule()
    sched.update({s.request_id: 7 for s in out.scheduled})
    return sched.schedule()


def test_reserve_decode_steps_grows_pages_to_each_budget():
    kv, sched = make(64, 4, max_model_len=30)
    out = _decoding(sched, kv, {"a": 5, "b": 26})
    assert all(s.num_tokens == 1 for s in out.scheduled)
    budgets = sched.reserve_decode_steps(8)
    # a: 6 tokens, 8 more fit; b: 27 tokens, max_model_len 30 leaves 3
    assert budgets == {"a": 8, "b": 3}
    assert len(kv.page_table("a")) == _pages(5 + 8, 4) and len(kv.page_table("b")) == _pages(26 + 3, 4)
    finished = sched.update_decodes({"a": [1, 2, 3], "b": [4, 5, 6]})
    seqs = {s.request_id: s for s in finished}
    assert list(seqs) == ["b"] and seqs["b"].status is Status.FINISHED_LENGTH and seqs["b"].num_tokens == 30
    a = sched._live["a"]
    assert a.output_token_ids == [7, 1, 2, 3] and a.num_computed_tokens == a.num_tokens - 1
    kv.check_invariants()


def test_reserve_decode_steps_refuses_prefills_and_full_pools_without_changes():
    kv, sched = make(64, 4, budget=4)
    sched.add(Sequence("long", list(range(1, 11)), 20))
    sched.schedule()  # a chunk of 4 prompt tokens
    assert sched.reserve_decode_steps(4) is None
    kv, sched = make(6, 4)  # 5 usable pages
    _decoding(sched, kv, {"a": 7, "b": 7})  # two pages each, one free
    tables = {rid: kv.page_table(rid) for rid in ("a", "b")}
    assert sched.reserve_decode_steps(8) is None  # each needs two more pages
    assert {rid: kv.page_table(rid) for rid in ("a", "b")} == tables
    sched.update({"a": 1, "b": 2})  # the single step still records
    assert sched._live["a"].output_token_ids == [7, 1]


def test_update_decodes_stops_where_the_caller_finishes_a_sequence():
    kv, sched = make(64, 4)
    _decoding(sched, kv, {"a": 3, "b": 3}, max_tokens=20)
    sched.reserve_decode_steps(4)
    seen = []

    def on_token(seq, j):
        seen.append((seq.request_id, j))
        if seq.request_id == "a" and seq.output_token_ids[-1] == 9:
            sched.finish("a", Status.FINISHED_STOPPED)

    sched.update_decodes({"a": [8, 9, 10, 11], "b": [1, 2]}, on_token)
    assert seen == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert "a" not in sched._live and sched._live["b"].output_token_ids == [7, 1, 2]
    kv.check_invariants()


def test_update_decodes_errors():
    kv, sched = make(64, 4)
    _decoding(sched, kv, {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="reserve_decode_steps"):
        sched.update_decodes({"a": [1], "b": [1]})
    sched.reserve_decode_steps(2)
    with pytest.raises(ValueError, match="update_decodes"):
        sched.update({"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"\['a'\]; the running reserved ones are \['a', 'b'\]"):
        sched.update_decodes({"a": [1]})
    with pytest.raises(ValueError, match="request_id='b' completed its scheduled tokens"):
        sched.update_decodes({"a": [1], "b": [-3]})
    with pytest.raises(ValueError, match="3 tokens for request_id='a', whose budget was 1 to 2"):
        sched.update_decodes({"a": [1, 2, 3], "b": [1]})
    sched.update_decodes({"a": [1, 2], "b": [3]})  # the failed calls changed nothing
    assert sched._live["a"].output_token_ids == [7, 1, 2] and sched._live["b"].output_token_ids == [7, 3]
    with pytest.raises(ValueError, match="num_steps=0"):
        sched.reserve_decode_steps(0)


def test_unmixed_batches_keep_prefills_and_decodes_apart():
    """mixed_batches=False: a step that prefills holds no decode; decodes run when nobody can be admitted."""
    kv = KVCacheManager(64, 4)
    sched = Scheduler(kv, max_num_seqs=3, max_num_batched_tokens=8, max_model_len=64, mixed_batches=False)
    device = FakeDevice(kv)
    for rid, n in (("a", 5), ("b", 12), ("c", 3), ("d", 4)):
        sched.add(Sequence(rid, list(range(1, n + 1)), 6))
    kinds = []
    while sched.has_unfinished():
        out = sched.schedule()
        seqs = {s.request_id: sched._live[s.request_id] for s in out.scheduled}
        decode = [s.num_tokens == 1 and bool(seqs[s.request_id].output_token_ids) for s in out.scheduled]
        chunk = [s.num_tokens > 1 for s in out.scheduled]
        assert not (any(decode) and any(chunk)), out  # never padded to a chunk's length for decodes
        kinds.append("decode" if any(decode) else "prefill")
        sched.update(device.run(out.scheduled, seqs))
    assert kinds[:3] == ["prefill", "prefill", "prefill"]  # a (5) + b (3 of 12), b (8), b (1) + c (3) ...
    assert "decode" in kinds and kinds.index("decode") > 0
    kv.check_invariants()


@pytest.mark.parametrize("seed", [0, 1])
def test_update_decodes_at_once_equals_token_by_token(seed):
    """Sequences outside `watched` take their tokens in one go: the same outputs, computed counts,
    finishes, page tables and prefix-cache entries as one token at a time."""
    rng = random.Random(seed)
    prompts = {rid: [rng.randint(1, 50) for _ in range(rng.randint(2, 9))] for rid in "abcd"}
    limits = {rid: rng.randint(3, 14) for rid in "abcd"}
    results = []
    for watched in (None, set()):
        kv, sched = make(128, 4, max_model_len=20)
        seqs = {rid: Sequence(rid, list(p), limits[rid]) for rid, p in prompts.items()}
        for seq in seqs.values():
            sched.add(seq)
        sched.update({s.request_id: 3 for s in sched.schedule().scheduled})
        calls, finished, draw = [], [], random.Random(seed + 10)
        while sched.has_unfinished():
            sched.schedule()
            budgets = sched.reserve_decode_steps(5)
            tokens = {rid: [draw.randint(1, 60) for _ in range(b)] for rid, b in budgets.items()}
            tables = {rid: list(kv.page_table(rid)) for rid in budgets}
            done = sched.update_decodes(tokens, lambda q, j: calls.append((q.request_id, j)), watched)
            finished += [s.request_id for s in done]
            kv.check_invariants()
        # Prefix hits of each whole output: the pages registered for reuse.
        hits = {rid: kv.allocate_prompt(f"again-{rid}", seq.prompt_token_ids + seq.output_token_ids + [0])
                for rid, seq in seqs.items()}
        state = {rid: (seq.output_token_ids, seq.num_computed_tokens, seq.status) for rid, seq in seqs.items()}
        last_calls = {rid: max(j for r, j in calls if r == rid) for rid in seqs}
        results.append((finished, hits, state, last_calls, tables))
    assert results[0] == results[1]
    finished, hits, state, _, _ = results[0]
    assert sorted(finished) == list("abcd") and all(s[2] is Status.FINISHED_LENGTH for s in state.values())
    assert all(len(state[rid][0]) == limits[rid] or len(prompts[rid]) + len(state[rid][0]) == 20 for rid in seqs)
    assert sum(hits.values()) > 0  # full pages were registered


def test_reserve_next_decode_steps_reserves_the_visit_after_and_records_in_order():
    kv, sched = make(64, 4, max_model_len=40)
    _decoding(sched, kv, {"a": 5, "b": 26, "c": 9}, max_tokens=12)
    assert sched.reserve_decode_steps(4) == {"a": 4, "b": 4, "c": 4}
    sched.finish("c", Status.FINISHED_ABORTED)  # aborted while its visit runs: no next visit
    # a: 1 + 4 outputs of 12, 4 more; b: 27 + 4 tokens of max_model_len 40, 4 more
    assert sched.reserve_next_decode_steps(4) == {"a": 4, "b": 4}
    assert len(kv.page_table("a")) == _pages(5 + 8, 4) and len(kv.page_table("b")) == _pages(26 + 8, 4)
    assert sched.reserve_next_decode_steps(4) is None  # one visit ahead at most
    with pytest.raises(ValueError, match="call update_decodes"):
        sched.schedule()
    sched.update_decodes({"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]})
    with pytest.raises(ValueError, match=r"\['a'\]; the running reserved ones are \['a', 'b'\]"):
        sched.update_decodes({"a": [9]})
    sched.update_decodes({"a": [9, 10], "b": [11, 12, 13, 14]})  # a row may stop early (a stop token)
    assert sched._live["a"].output_token_ids == [7, 1, 2, 3, 4, 9, 10]
    assert sched._live["b"].output_token_ids == [7, 5, 6, 7, 8, 11, 12, 13, 14]
    kv.check_invariants()
    # the next reservation: a has 5 outputs left (4, then 1), b 3 (then none: it sits out)
    sched.schedule()
    assert sched.reserve_decode_steps(4) == {"a": 4, "b": 3}
    assert sched.reserve_next_decode_steps(4) == {"a": 1}


def test_reserve_next_decode_steps_needs_free_pages_and_a_reserved_visit():
    kv, sched = make(64, 4)
    _decoding(sched, kv, {"a": 3})
    assert sched.reserve_next_decode_steps(4) is None  # nothing reserved yet
    kv, sched = make(6, 4)  # 5 usable pages
    _decoding(sched, kv, {"a": 3, "b": 3}, max_tokens=20)  # one page each
    assert sched.reserve_decode_steps(2) == {"a": 2, "b": 2}
    tables = {rid: kv.page_table(rid) for rid in ("a", "b")}
    assert sched.reserve_next_decode_steps(8) is None  # each would need three more pages
    assert {rid: kv.page_table(rid) for rid in ("a", "b")} == tables
    with pytest.raises(ValueError, match="num_steps=0"):
        sched.reserve_next_decode_steps(0)
    sched.update_decodes({"a": [1, 2], "b": [3, 4]})
    sched.schedule()  # nothing was left reserved
    kv.check_invariants()
