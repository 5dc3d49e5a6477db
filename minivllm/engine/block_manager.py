"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, and prefix caching.

A full block is identified by a hash chain over its tokens and every token before it, so
two requests that share a prefix share its blocks. A block whose last user finishes goes
to the back of the free queue with its hash kept: it is reused as a cache hit until the
free queue reaches it and its memory is given to new tokens (least recently freed first).
"""
from collections import OrderedDict

from minivllm.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(token_ids, prefix_hash: int | None) -> int:
    return hash((prefix_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # An ordered set (keys only): a prefix hit takes its block out of the middle in O(1), where a deque's
        # remove scans the whole pool.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.peak_blocks_in_use = 0  # held by running sequences at once, since the engine started

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks ``seq`` must take so that its table covers ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the leading full blocks of ``seq`` (never its last token:
        at least one token must be computed to produce logits). None while the prompt's logprobs
        are still to be computed: they need its logits."""
        if not self.enable_prefix_caching or seq.num_unscored_prompt_tokens:
            return []
        hits, prefix_hash = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            prefix_hash = chain_hash(tokens, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            hits.append(block_id)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether ``seq`` can take ``hits`` and enough new blocks for ``num_tokens`` tokens."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new = max(0, -(-num_tokens // self.block_size) - len(hits))
        return revived + new <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int]):
        """Give a new (or preempted) sequence its cached prefix blocks."""
        assert not seq.block_table
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        self._note_peak()
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)

    def allocate(self, seq: Sequence, num_tokens: int):
        """Grow ``seq``'s block table to cover ``num_tokens`` tokens (caller checked room)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self.blocks[self.free_block_ids.popitem(last=False)[0]]
            if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
                del self.hash_to_block_id[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block.block_id)
        self._note_peak()

    def _note_peak(self):
        # Free blocks include cached ones no sequence holds: the rest are in use.
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, len(self.blocks) - len(self.free_block_ids))

    def register_computed_blocks(self, seq: Sequence):
        """Enter the blocks that ``seq`` has filled and computed into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        prefix_hash = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prefix_hash = chain_hash(tokens, prefix_hash)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = prefix_hash, tokens
            self.hash_to_block_id.setdefault(prefix_hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, seq.num_computed_tokens // bs)

    def free(self, seq: Sequence):
        # Tail blocks first, so a sequence's prefix stays cached longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
