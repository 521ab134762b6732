"""Actor pools and feeding them, on a real local Ray cluster (2 CPUs)."""

import os
import threading
import time

import pytest
import ray

from diffarc.pipeline.cluster import (
    PROGRESS_GROUP, ActorsLostError, PoolShape, actor_pool, pool_shape, reported_progress, run_on_pool,
)

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

    def double_unless(self, number: int, fatal: int) -> int:
        """Like `double`, but the number `fatal` kills the actor's process, as a crashing codec would."""
        if number == fatal:
            os._exit(1)
        return self.double(number)


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
    assert [pool_shape(work=n).actors for n in (0, 1, 5)] == [1, 1, 2]  # no more actors than pieces of work
    assert pool_shape(3, work=2).actors == 2


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


def test_an_actor_killed_three_times_costs_no_result(ray_cluster):
    kills = []

    def kill_position_zero(pool, stop: threading.Event):
        for _ in range(3):
            victim = pool[0]
            if stop.wait(0.8):
                return
            ray.kill(victim)  # for good: Ray will not restart it
            kills.append(victim)
            while pool[0] is victim and not stop.is_set():  # until the pool has replaced it
                time.sleep(0.05)

    with actor_pool(Echo, 0.2) as pool:
        stop = threading.Event()
        killer = threading.Thread(target=kill_position_zero, args=(pool, stop))
        killer.start()
        try:
            results = list(run_on_pool(pool, range(40), lambda actor, n: actor.double.remote(n)))
        finally:
            stop.set()
            killer.join()
        assert len(kills) == 3 and pool.replaced == 3  # all three kills landed while the job ran
    assert sorted(results) == [2 * n for n in range(40)]  # every result, none twice


def test_work_that_kills_every_actor_it_meets_stops_the_job_with_a_sentence(ray_cluster):
    with actor_pool(Echo, 0.0) as pool:
        results = []
        with pytest.raises(ActorsLostError, match="lost its actor 3 times.*run the command again to resume"):
            # One task in flight per actor: with two, the fatal task's dying actor also loses its
            # neighbour, and whether that neighbour's loss (which replaces the actor) or the fatal task's
            # third (which stops the job) reaches the driver first is up to Ray.
            tasks = run_on_pool(pool, range(6), lambda actor, n: actor.double_unless.remote(n, fatal=3),
                                in_flight_per_actor=1)
            for result in tasks:
                results.append(result)
        assert pool.replaced == 2  # the first two losses replaced their actors; the third stopped the job
    assert 6 not in results


class Counting:
    """A stand-in for a decode actor: works through a shard an item at a time, and says how far it is."""

    def __init__(self):
        self.items = 0

    @ray.method(concurrency_group=PROGRESS_GROUP)
    def progress(self) -> tuple[int, int]:
        return self.items, 0

    def work_through(self, items: int) -> int:
        for _ in range(items):
            time.sleep(0.05)
            self.items += 1
        return items


def test_progress_counts_items_within_a_shard_with_the_total(ray_cluster):
    seen = []
    with actor_pool(Counting, actors=1) as pool:
        with reported_progress(pool, lambda done, total, failed: seen.append((done, total)), 40, seconds=0.1):
            assert list(run_on_pool(pool, [40], lambda actor, items: actor.work_through.remote(items))) == [40]
    assert all(total == 40 for _, total in seen)
    assert any(0 < done < 40 for done, _ in seen), seen  # the one shard's items, counted as they were done
