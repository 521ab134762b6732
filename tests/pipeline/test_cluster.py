"""Actor pools and feeding them, on a real local Ray cluster (2 CPUs)."""

import os
import time

import pytest
import ray

from diffarc.pipeline.cluster import PoolShape, actor_pool, pool_shape, run_on_pool

pytestmark = pytest.mark.slow


class Echo:
    """A stand-in for a codec actor: answers with its process id, doubles numbers slowly."""

    def __init__(self, delay: float):
        self.delay = delay

    def pid(self) -> int:
        return os.getpid()

    def double(self, number: int) -> int:
        time.sleep(self.delay)
        return 2 * number


def is_dead(actor, within: float = 60.0) -> bool:
    """Whether the actor stops answering within `within` seconds: ray.kill is asynchronous, so a call
    made right after it may still be served by the dying actor."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=within)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def test_pool_shape_is_one_actor_per_cpu_without_gpus(ray_cluster):
    assert pool_shape() == PoolShape(actors=2, gpus_per_actor=0, cpus_per_actor=1)
    assert pool_shape(3).actors == 3


def test_actors_are_killed_when_the_block_ends(ray_cluster):
    with actor_pool(Echo, 0.0) as pool:
        assert len(pool) == 2
        assert len(set(ray.get([actor.pid.remote() for actor in pool]))) == 2  # two processes
    assert all(is_dead(actor) for actor in pool)


def test_actors_are_killed_when_the_block_raises(ray_cluster):
    with pytest.raises(RuntimeError, match="job failed"):
        with actor_pool(Echo, 0.0, actors=1) as pool:
            ray.get(pool[0].pid.remote())
            raise RuntimeError("job failed")
    assert is_dead(pool[0])


def test_run_on_pool_yields_every_result_once_with_bounded_work_in_flight(ray_cluster):
    pulled, submitted, in_flight = [], [], []

    def tasks():
        for number in range(20):
            pulled.append(number)
            yield number

    def submit(actor, number):
        submitted.append(number)
        return actor.double.remote(number)

    results = []
    with actor_pool(Echo, 0.05) as pool:
        for result in run_on_pool(pool, tasks(), submit, in_flight_per_actor=2):
            in_flight.append(len(submitted) - len(results))
            results.append(result)
    assert sorted(results) == [2 * n for n in range(20)]
    assert submitted == pulled == list(range(20))  # tasks are pulled only as they are submitted
    assert max(in_flight) == 4  # two per actor, never more
