"""A model of PyTorch's CUDA caching allocator, to replay a step's allocations.

A GPU step's ``memory_allocated`` counts the allocator's blocks, not the
tensors' bytes, and ``memory_reserved`` (what the process holds from the
driver) counts the segments it obtained with ``cudaMalloc`` and keeps cached
across steps. Both follow from the order of allocations and frees, which a CPU
run (real or on fake tensors) records; this module replays that order through
the allocator's rules, read from ``c10/cuda/CUDACachingAllocator.cpp``
(defaults: no ``max_split_size_mb``, no ``roundup_power2_divisions``, no
garbage-collection threshold, one stream):

- sizes are rounded up to 512 B (``kMinBlockSize``); requests of at most
  1 MiB (``kSmallSize``) come from the small pool, others from the large one;
- a request takes the smallest cached free block of its pool that is large
  enough (blocks are ordered by size, then address);
- with none, a new segment is obtained: 2 MiB (``kSmallBuffer``) for small
  requests, 20 MiB (``kLargeBuffer``) for requests under 10 MiB
  (``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``);
- a block larger than the request is split when what remains is at least
  512 B (small pool) or more than 1 MiB (large pool); otherwise the whole
  block is handed out, and counted as allocated;
- a freed block merges with free neighbours of its segment and is cached;
  segments are never returned (no ``empty_cache()``), so reserved memory only
  grows.

With ``expandable_segments:True`` (``PYTORCH_CUDA_ALLOC_CONF``) each pool is
one segment that grows: when no cached block fits, the free block at its end
(if any) is extended by mapping pages of 2 MiB (small pool) or 20 MiB (large
pool) after it (``try_allocate_expandable_block``, ``map_block``), and any
block is split when at least 512 B remain.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = [
    "CachingAllocator",
    "K_LARGE_BUFFER",
    "K_MIN_BLOCK",
    "K_MIN_LARGE_ALLOC",
    "K_ROUND_LARGE",
    "K_SMALL_BUFFER",
    "K_SMALL_SIZE",
    "allocation_size",
    "round_size",
]

K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_LARGE_BUFFER = 20 << 20
K_ROUND_LARGE = 2 << 20


def round_size(size: int) -> int:
    """``round_size``: at least 512 B, and a multiple of 512 B."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    return K_MIN_BLOCK * ((size + K_MIN_BLOCK - 1) // K_MIN_BLOCK)


def allocation_size(size: int) -> int:
    """``get_allocation_size``: the segment obtained for a (rounded) request no cached block fits."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    small: bool
    allocated: bool = False
    prev: _Block | None = field(default=None, repr=False)
    next: _Block | None = field(default=None, repr=False)


class CachingAllocator:
    """Blocks, segments and the two pools, with the counters ``torch.cuda`` reports.

    ``allocated`` / ``reserved`` are ``memory_allocated()`` / ``memory_reserved()``;
    ``peak_allocated`` / ``peak_reserved`` their maxima since the last
    :meth:`reset_peaks` (``reset_peak_memory_stats``).
    """

    def __init__(self, expandable: bool = False) -> None:
        self.expandable = expandable
        self._free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # (size, addr, id)
        self._blocks: dict[int, _Block] = {}  # free blocks by id(), for the sorted lists
        self._next_addr = 0
        # expandable: each pool's one segment, its mapped end and its last block (small pool low, large high)
        self._end = {True: 0, False: 1 << 60}
        self._last: dict[bool, _Block | None] = {True: None, False: None}
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments = 0

    @property
    def cached_blocks(self) -> list[tuple[int, bool]]:
        """The free blocks the allocator keeps: (size, from the small pool), smallest first."""
        return sorted((size, small) for small, pool in self._free.items() for size, _, _ in pool)

    def reset_peaks(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    # ------------------------------------------------------------ internals
    def _cache(self, block: _Block) -> None:
        self._blocks[id(block)] = block
        bisect.insort(self._free[block.small], (block.size, block.addr, id(block)))

    def _uncache(self, block: _Block) -> None:
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, (block.size, block.addr, id(block)))
        del pool[i]
        del self._blocks[id(block)]

    def _grow(self, size: int, small: bool) -> _Block:
        """expandable: map pages after the pool's segment, merged into the free block at its end."""
        last = self._last[small]
        tail = last if last is not None and not last.allocated else None
        need = size - (tail.size if tail is not None else 0)
        page = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        mapped = page * ((need + page - 1) // page)
        self.reserved += mapped
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self._end[small] += mapped
        if tail is not None:
            self._uncache(tail)
            tail.size += mapped
            return tail
        if last is None:
            self.segments += 1
        block = _Block(self._end[small] - mapped, mapped, small, prev=last)
        if last is not None:
            last.next = block
        self._last[small] = block
        return block

    def _new_segment(self, size: int, small: bool) -> _Block:
        segment = allocation_size(size)
        block = _Block(self._next_addr, segment, small)
        self._next_addr += segment
        self.reserved += segment
        self.segments += 1
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    # ------------------------------------------------------------- the API
    def malloc(self, nbytes: int) -> _Block:
        """Allocate ``nbytes``: a cached block if one fits, else a new segment; split when the rules say."""
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            block = self._blocks[pool[i][2]]
            self._uncache(block)
        elif self.expandable:
            block = self._grow(size, small)
        else:
            block = self._new_segment(size, small)
        remaining = block.size - size
        if (remaining >= K_MIN_BLOCK) if (small or self.expandable) else (remaining > K_SMALL_SIZE):
            rest = _Block(block.addr + size, remaining, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            elif self._last[small] is block:
                self._last[small] = rest
            block.next = rest
            block.size = size
            self._cache(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: _Block) -> None:
        """Return a block to its pool, merged with free neighbours in its segment."""
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is None or neighbour.allocated:
                continue
            self._uncache(neighbour)
            if neighbour is block.prev:
                block.addr = neighbour.addr
                block.prev = neighbour.prev
                if neighbour.prev is not None:
                    neighbour.prev.next = block
            else:
                block.next = neighbour.next
                if neighbour.next is not None:
                    neighbour.next.prev = block
                elif self._last[block.small] is neighbour:
                    self._last[block.small] = block
            block.size += neighbour.size
        self._cache(block)
