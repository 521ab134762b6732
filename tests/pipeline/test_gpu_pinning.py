"""Encode actors on a cluster with GPUs each get a GPU of their own when their encoder runs a network, and
none, nor any network loaded, when it does not (logical GPUs: no hardware needed)."""

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
    summary = run_encode(str(image_folder), str(tmp_path / "arc"), EncodeOptions("hyperprior", shard_size=1))
    assert summary.encoded == 6
    assert len(summary.workers) == 2  # one actor per GPU
    assigned = [tuple(worker["gpu_ids"]) for worker in summary.workers]
    assert all(len(ids) == 1 for ids in assigned)
    assert sorted(assigned) == [("0",), ("1",)]
    assert all(worker["weights"] for worker in summary.workers)  # each loaded the hyperprior's network


@pytest.mark.parametrize("codec", ["hfd", "jpeg"])
def test_an_encoder_that_runs_no_network_asks_for_no_gpu(two_gpu_cluster, image_folder, tmp_path, codec):
    # hfd's encoder is AVIF on the CPU: on a GPU fleet its actors are CPU actors, one per CPU, that never
    # load the detail decoder (the archive's spec, its fingerprint, comes from one task that does).
    summary = run_encode(str(image_folder), str(tmp_path / "arc"), EncodeOptions(codec, shard_size=1))
    assert summary.encoded == 6 and len(summary.workers) == 2
    assert all(worker["gpu_ids"] == [] and worker["device"] == "cpu" for worker in summary.workers)
    assert all(worker["weights"] == [] for worker in summary.workers)
