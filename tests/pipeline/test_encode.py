"""The encode job's own parts: how a job is cut into shards, and the actor's two ways of loading images."""

import dataclasses

import pytest

from diffarc.pipeline.batches import codec_spec
from diffarc.pipeline.encode import SHORTEST_TAIL_SHARD, EncodeWorker, cut_into_shards
from diffarc.pipeline.images import DEFAULT_MAX_PIXELS
from diffarc.pipeline.sources import list_sources
from diffarc.pipeline.storage import Location


@pytest.mark.parametrize("items, actors, shard_size", [(10_000, 2, 512), (960, 2, 512), (7, 2, 2), (100, 1, 512),
                                                       (3, 4, 512), (0, 2, 512)])  # fmt: skip
def test_shards_hold_every_item_once_in_order_and_never_more_than_the_shard_size(items, actors, shard_size):
    shards = list(cut_into_shards(list(range(items)), actors, shard_size))
    assert [i for shard in shards for i in shard] == list(range(items))
    assert all(0 < len(shard) <= shard_size for shard in shards)


def test_the_last_shards_are_short_so_no_actor_waits_on_a_full_one():
    sizes = [len(shard) for shard in cut_into_shards(list(range(10_000)), 2, 512)]
    assert sizes[:10] == [512] * 10
    # What the two actors' queues hold at the end (two shards each) is a few small shards, none a few items.
    assert all(SHORTEST_TAIL_SHARD <= size <= 2 * SHORTEST_TAIL_SHARD for size in sizes[-4:]), sizes
    assert len(sizes) < 10_000 / 512 + 15, "the tail should not add many shards"


def test_a_job_smaller_than_a_shard_per_actor_gives_each_actor_an_equal_part():
    assert [len(s) for s in cut_into_shards(list(range(6)), 2, 512)] == [3, 3]
    assert [len(s) for s in cut_into_shards(list(range(40)), 4, 512)] == [10, 10, 10, 10]
    assert [len(s) for s in cut_into_shards(list(range(96)), 2, 512)] == [48, 48]


def test_decoding_on_threads_ahead_gives_what_decoding_in_turn_gives(ray_cluster, bad_inputs, tmp_path):
    # A CPU actor with one core decodes in turn; a GPU actor, or one with cores to spare, on threads ahead
    # of the codec. Both must encode, fail and record the same items the same way.
    folder, expected = bad_inputs
    items = list_sources(str(folder)).items
    results = []
    for spare_cores in (False, True):
        worker = EncodeWorker(codec_spec("jpeg", {}), {}, None, DEFAULT_MAX_PIXELS, 4, spare_cores)
        assert worker.decode_ahead is spare_cores  # on a CPU
        results.append(worker.encode_shard(Location(str(tmp_path / f"arc{spare_cores}")), items, 3))
    in_turn, ahead = results
    good = sorted(key for key, shape in expected.items() if shape is not None)
    assert sorted(in_turn.keys) == good and in_turn.keys == ahead.keys
    assert {f.key for f in in_turn.failures} == set(expected) - set(good)
    assert sorted((f.key, f.stage) for f in in_turn.failures) == sorted((f.key, f.stage) for f in ahead.failures)
    assert dataclasses.replace(in_turn.entry, path="") == dataclasses.replace(ahead.entry, path="")
