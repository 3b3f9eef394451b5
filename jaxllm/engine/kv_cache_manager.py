"""Host-side page allocator for the paged KV cache, with prefix reuse of full pages."""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
from collections.abc import Sequence

from jaxllm.kv_cache import SCRATCH_PAGE
_ROOT_HASH = b""  # parent hash of a sequence's first page


@dataclasses.dataclass(frozen=True)
class PrefixStats:
    """Prompt tokens looked up in the prefix cache and tokens found there."""

    queries: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def _page_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained hash of one full page: digest of (parent page's hash, page tokens)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array.array("q", tokens).tobytes())
    return h.digest()


def _pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVCacheManager:
    """Hands out KV pages to sequences; shares full prompt pages whose content is already cached.

    Each usable page is in exactly one state: free (never used, or unregistered and
    unreferenced), evictable (registered in the prefix cache, refcount 0) or referenced
    by at least one live sequence's page table.
    """

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (page 0 is reserved scratch)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._refcount = [0] * num_pages
        self._hash_of_page: dict[int, bytes] = {}
        self._page_of_hash: dict[bytes, int] = {}
        self._tables: dict[str, list[int]] = {}
        self._seq_hashes: dict[str, list[bytes]] = {}  # chained hashes of the seq's leading full pages
        self._queries = 0
        self._hits = 0

    # ----------------------------------------------------------------------------- queries

    def num_free_pages(self) -> int:
        """Pages that can be handed out now (free plus evictable)."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Fraction of usable pages referenced by live sequences."""
        return 1.0 - self.num_free_pages() / (self.num_pages - 1)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens fit in fresh pages (ignoring prefix hits)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        return _pages_for(num_tokens, self.page_size) <= self.num_free_pages()

    def page_table(self, seq_id: str) -> list[int]:
        """Page ids of the sequence, in token order (a copy)."""
        return list(self._table(seq_id))

    def prefix_stats(self) -> PrefixStats:
        return PrefixStats(queries=self._queries, hits=self._hits)

    # ----------------------------------------------------------------------------- updates

    def allocate_prompt(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        """Give a new sequence pages for its prompt; return how many prompt tokens are cached.

        Returns None (and changes nothing) when the pool cannot hold the prompt.
        """
        if seq_id in self._tables:
            raise ValueError(f"seq_id={seq_id!r} is already allocated")
        if len(token_ids) == 0:
            raise ValueError(f"token_ids for seq_id={seq_id!r} is empty; need at least one token")
        S = self.page_size
        hashes: list[bytes] = []
        hit_pages: list[int] = []
        if self.enable_prefix_caching:
            # At least the last prompt token must be recomputed to get its logits.
            for i in range((len(token_ids) - 1) // S):
                h = _page_hash(hashes[-1] if hashes else _ROOT_HASH, token_ids[i * S : (i + 1) * S])
                page = self._page_of_hash.get(h)
                if page is None:
                    break
                hashes.append(h)
                hit_pages.append(page)
        num_new = _pages_for(len(token_ids), S) - len(hit_pages)
        # Hit pages that sit in the evictable set stop being available once we reference them.
        available = self.num_free_pages() - sum(1 for p in hit_pages if self._refcount[p] == 0)
        if num_new > available:
            return None
        for page in hit_pages:
            self._ref(page)
        table = hit_pages + [self._take_fresh_page() for _ in range(num_new)]
        self._tables[seq_id] = table
        self._seq_hashes[seq_id] = hashes
        num_cached = len(hit_pages) * S
        if self.enable_prefix_caching:
            self._queries += len(token_ids)
            self._hits += num_cached
        return num_cached

    def append(self, seq_id: str, num_tokens: int) -> bool:
        """Grow the sequence's pages to hold `num_tokens` tokens in all; False (no change) if out of pages."""
        table = self._table(seq_id)
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} for seq_id={seq_id!r} must be >= 1")
        num_new = _pages_for(num_tokens, self.page_size) - len(table)
        if num_new <= 0:
            return True
        if num_new > self.num_free_pages():
            return False
        table.extend(self._take_fresh_page() for _ in range(num_new))
        return True

    def has_uncached_full_pages(self, seq_id: str, num_tokens: int) -> bool:
        """Whether `num_tokens` computed tokens fill a page that cache_full_pages has not registered."""
        return self.enable_prefix_caching and num_tokens // self.page_size > len(self._seq_hashes[seq_id])

    def cache_full_pages(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """Register the sequence's full pages (whose K/V for `token_ids` is written) for reuse."""
        table = self._table(seq_id)
        S = self.page_size
        num_full = len(token_ids) // S
        if num_full > len(table):
            raise ValueError(
                f"token_ids has {len(token_ids)} tokens but seq_id={seq_id!r} holds only "
                f"{len(table)} pages of {S} tokens"
            )
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes[seq_id]
        for i in range(len(hashes), num_full):
            h = _page_hash(hashes[-1] if hashes else _ROOT_HASH, token_ids[i * S : (i + 1) * S])
            hashes.append(h)
            page = table[i]
            # A duplicate of an already-registered page stays private (freed, not cached).
            if h not in self._page_of_hash and page not in self._hash_of_page:
                self._page_of_hash[h] = page
                self._hash_of_page[page] = h

    def free(self, seq_id: str) -> None:
        """Drop the sequence's page references; cached pages become evictable, others free."""
        table = self._table(seq_id)
        del self._tables[seq_id]
        del self._seq_hashes[seq_id]
        # Tail pages first, so a prefix outlives its continuations in the LRU order.
        for page in reversed(table):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if page in self._hash_of_page:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # ----------------------------------------------------------------------------- internals

    def _table(self, seq_id: str) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise ValueError(f"seq_id={seq_id!r} is not allocated")
        return table

    def _ref(self, page: int) -> None:
        if self._refcount[page] == 0:
            del self._evictable[page]
        self._refcount[page] += 1

    def _take_fresh_page(self) -> int:
        """A page for new content: from the free list, else the LRU evictable page (uncached)."""
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._page_of_hash[self._hash_of_page.pop(page)]
        self._refcount[page] = 1
        return page

    def check_invariants(self) -> None:
        """Raise AssertionError if the page bookkeeping is inconsistent."""
        counts = [0] * self.num_pages
        for seq_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"{seq_id!r} maps a page twice: {table}"
            assert len(self._seq_hashes[seq_id]) <= len(table), f"{seq_id!r} has hashes past its pages"
            for page in table:
                assert 0 < page < self.num_pages, f"{seq_id!r} holds invalid page {page}"
                counts[page] += 1
        assert set(self._seq_hashes) == set(self._tables), "hash chains and page tables disagree"
        assert counts == self._refcount, f"refcounts {self._refcount} != page-table counts {counts}"
        free = set(self._free)
        assert len(free) == len(self._free), "free list holds a page twice"
        assert SCRATCH_PAGE not in free and SCRATCH_PAGE not in self._evictable, "scratch page handed out"
        assert not free & self._evictable.keys(), "page both free and evictable"
        for page in free:
            assert counts[page] == 0, f"free page {page} is referenced"
            assert page not in self._hash_of_page, f"free page {page} is registered"
        for page in self._evictable:
            assert counts[page] == 0, f"evictable page {page} is referenced"
            assert page in self._hash_of_page, f"evictable page {page} is not registered"
        referenced = sum(1 for c in counts if c > 0)
        assert len(free) + len(self._evictable) + referenced == self.num_pages - 1, "page leaked"
        assert len(self._hash_of_page) == len(self._page_of_hash), "hash maps disagree in size"
        for page, h in self._hash_of_page.items():
            assert self._page_of_hash.get(h) == page, f"hash maps disagree on page {page}"
