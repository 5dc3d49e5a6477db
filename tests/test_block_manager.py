"""Block manager and scheduler invariants under random operation sequences."""
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence
from minivllm.sampling_params import SamplingParams

BLOCK = 4
NUM_BLOCKS = 12


class BlockManagerMachine(RuleBasedStateMachine):
    """Admits sequences (often sharing prefixes), grows them token by token, frees them."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK)
        self.live: list[Sequence] = []
        self.hits_seen = 0

    @rule(prefix=st.sampled_from([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9, 9], []]),
          tail=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def admit(self, prefix, tail):
        seq = Sequence(prefix + tail, SamplingParams(), seed=0)
        hits = self.bm.prefix_hits(seq)
        for i, block_id in enumerate(hits):  # a hit really holds those tokens
            assert self.bm.blocks[block_id].token_ids == tuple(seq.token_ids[i * BLOCK:(i + 1) * BLOCK])
        if not self.bm.can_admit(seq, hits, seq.num_tokens):
            return
        self.bm.admit(seq, hits)
        self.bm.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        self.bm.register_computed_blocks(seq)
        self.hits_seen += len(hits)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 3))
    def grow(self, data, token):
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.append(token)
        if self.bm.blocks_needed(seq, seq.num_tokens) > self.bm.num_free_blocks:
            seq.token_ids.pop()
            return
        self.bm.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        self.bm.register_computed_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @invariant()
    def reference_counts_match_users(self):
        users = [0] * NUM_BLOCKS
        for seq in self.live:
            assert len(seq.block_table) == -(-seq.num_tokens // BLOCK)
            for block_id in seq.block_table:
                users[block_id] += 1
        assert [b.ref_count for b in self.bm.blocks] == users
        free = list(self.bm.free_block_ids)
        assert len(free) == len(set(free)), "a block is in the free queue twice"
        assert set(free) == {i for i, n in enumerate(users) if n == 0}, "leaked or double-freed block"

    @invariant()
    def cache_index_points_at_matching_blocks(self):
        for h, block_id in self.bm.hash_to_block_id.items():
            assert self.bm.blocks[block_id].hash == h

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert all(b.ref_count == 0 for b in self.bm.blocks)


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(0, 50), min_size=9, max_size=30))
@settings(max_examples=50, deadline=None)
def test_shared_prefix_is_reused_after_free(tokens):
    bm = BlockManager(16, BLOCK)
    first = Sequence(tokens, SamplingParams(), seed=0)
    bm.admit(first, bm.prefix_hits(first))
    bm.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.register_computed_blocks(first)
    blocks = list(first.block_table)
    bm.free(first)
    second = Sequence(tokens + [7], SamplingParams(), seed=0)
    hits = bm.prefix_hits(second)
    assert hits == blocks[:len(tokens) // BLOCK]  # every full block of the first comes back
    bm.admit(second, hits)
    assert second.num_computed_tokens == len(hits) * BLOCK


def test_last_token_is_never_a_cache_hit():
    bm = BlockManager(8, BLOCK)
    seq = Sequence(list(range(8)), SamplingParams(), seed=0)
    bm.admit(seq, bm.prefix_hits(seq))
    bm.allocate(seq, 8)
    seq.num_computed_tokens = 8
    bm.register_computed_blocks(seq)
    bm.free(seq)
    again = Sequence(list(range(8)), SamplingParams(), seed=0)
    assert len(bm.prefix_hits(again)) == 1  # the second block holds the last token: recompute it


def test_a_prefix_hit_leaves_the_other_free_blocks_in_least_recently_freed_order():
    bm = BlockManager(8, BLOCK)
    seq = Sequence(list(range(9)), SamplingParams(), seed=0)  # three blocks, two of them full
    bm.admit(seq, bm.prefix_hits(seq))
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed_blocks(seq)
    table = list(seq.block_table)
    bm.free(seq)  # tail first: the prefix goes to the back of the queue
    assert list(bm.free_block_ids) == [3, 4, 5, 6, 7] + table[::-1]
    again = Sequence(list(range(4)) + [99, 98], SamplingParams(), seed=0)
    hits = bm.prefix_hits(again)
    assert hits == table[:1]
    bm.admit(again, hits)
    assert list(bm.free_block_ids) == [3, 4, 5, 6, 7] + table[:0:-1]
    bm.allocate(again, again.num_tokens)
    assert again.block_table == table[:1] + [3]  # new memory comes from the front
