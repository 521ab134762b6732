"""The split-a-bad-batch policy, with real codecs that fail on one real item."""

import numpy as np
import pytest

from diffarc.codecs import container
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.batches import decode_streams, map_batch

from ..conftest import photo_like

WIDE = np.zeros((1, 20000, 3), np.uint8)  # WebP cannot encode an image wider than 16383 px


@pytest.mark.parametrize("wide_at", [0, 1, 2])
def test_one_image_the_codec_refuses_costs_only_that_image(wide_at):
    codec = create_codec("webp")
    images = [photo_like(16, 16, seed=i) for i in range(2)]
    images.insert(wide_at, WIDE)
    failed = []
    done = map_batch(
        list(range(3)), lambda batch: codec.encode([images[i] for i in batch]), lambda i, r: failed.append((i, r))
    )
    assert [index for index, _ in done] == [i for i in range(3) if i != wide_at]
    assert all(codec.decode([stream])[0].shape == images[i].shape for i, stream in done)
    assert [index for index, _ in failed] == [wide_at] and "ValueError" in failed[0][1] and "16383" in failed[0][1]


def test_a_failing_batch_of_one_is_recorded_not_raised():
    codec = create_codec("webp")
    failed = []
    assert map_batch([WIDE], codec.encode, lambda item, reason: failed.append(reason)) == []
    assert len(failed) == 1 and "16383" in failed[0]
    assert map_batch([], codec.encode, lambda item, reason: failed.append(reason)) == []


@pytest.mark.parametrize("batch_size", [1, 4])
def test_decode_records_the_stream_it_cannot_decode_and_decodes_the_rest(batch_size):
    codec = create_codec("jpeg")
    images = [photo_like(20, 24, seed=i) for i in range(4)]
    streams = codec.encode(images)
    header, _ = container.unpack(streams[2])
    streams[2] = container.pack(header, b"\xff\xd8 not a jpeg")  # parses, does not decode
    streams = [container.unpack(stream) for stream in streams]  # parsed once, as an archive reader does
    keys = ["a", "b", "c", "d"]
    failures, decoded = [], []
    for start in range(0, 4, batch_size):
        batch = slice(start, start + batch_size)
        decoded += decode_streams(codec, keys[batch], streams[batch], failures, max_pixels=10_000)
    assert [key for key, _ in decoded] == ["a", "b", "d"]
    assert [(f.key, f.stage) for f in failures] == [("c", "decode")]
    assert "BitstreamError" in failures[0].reason


@pytest.mark.slow
def test_a_network_decoder_gives_the_decode_actors_pixels_whatever_threads_the_process_has(kodak):
    # hfd on this crop sums one value differently on 2 threads than on 1 (on the machine this was written
    # on); decode's actors have one core, and every reader decodes through decode_streams.
    import torch
    from PIL import Image

    codec = create_codec("hfd", {})
    [stream] = codec.encode([np.ascontiguousarray(np.asarray(Image.open(kodak / "kodim05.png").convert("RGB"))[:256, :256])])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = codec.decode([stream])[0]
        torch.set_num_threads(2)
        [(_, pixels)] = decode_streams(codec, ["k"], [container.unpack(stream)], [], 1 << 20)
        assert torch.get_num_threads() == 2  # the process's count, back
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(pixels, one_thread)
