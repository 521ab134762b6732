"""Encode actors on a cluster with GPUs each get a GPU of their own (logical GPUs: no hardware needed)."""

import pytest

from diffarc.pipeline.encode import EncodeOptions, run_encode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_gpu_cluster():
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_each_encode_actor_is_pinned_to_its_own_gpu(two_gpu_cluster, image_folder, tmp_path):
    summary = run_encode(str(image_folder), str(tmp_path / "arc"), EncodeOptions("jpeg", shard_size=1))
    assert summary.encoded == 6
    assert len(summary.workers) == 2  # one actor per GPU
    assigned = [tuple(worker["gpu_ids"]) for worker in summary.workers]
    assert all(len(ids) == 1 for ids in assigned)
    assert sorted(assigned) == [("0",), ("1",)]
