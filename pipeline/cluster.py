"""Ray: joining or starting a cluster, pools of codec-holding actors, and feeding them work.

    with actor_pool(Worker, *args, actors=n, address=a) as pool:      connect, start the actors
        for result in run_on_pool(pool, tasks, submit): ...         two tasks queued per actor
                                                                     leaving the block kills them

One actor holds one codec (its model loaded once). On a cluster with GPUs each actor asks for
`num_gpus=1`, so Ray pins it to a GPU of its own (it sets CUDA_VISIBLE_DEVICES per actor, and the
actor uses "cuda", its only visible device); otherwise actors run on CPUs.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import ray


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local one for this job."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


@dataclass(frozen=True)
class PoolShape:
    actors: int
    gpus_per_actor: int
    cpus_per_actor: float


def pool_shape(actors: int | None = None) -> PoolShape:
    """One actor per GPU when the cluster has GPUs, else one per CPU core; `actors` overrides the count."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return PoolShape(actors or gpus, 1, 1)
    cpus = max(1, int(resources.get("CPU", 1)))
    return PoolShape(actors or cpus, 0, 1)


@contextmanager
def actor_pool(actor_class: type, *args: Any, actors: int | None = None, address: str | None = None) -> Iterator[list]:
    """Actors of `actor_class(*args)`, shaped by `pool_shape(actors)`, alive for the `with` block.

    The actors are killed however the block is left (results consumed, an error, an interrupt), so a
    failed job does not leave actors holding GPUs and models in a cluster it joined.
    """
    connect(address)
    shape = pool_shape(actors)
    remote = ray.remote(actor_class).options(
        num_gpus=shape.gpus_per_actor,
        num_cpus=shape.cpus_per_actor,
        max_restarts=2,
        max_task_retries=2,  # a task on an actor that died (OOM, preempted node) is run again
    )
    pool = [remote.remote(*args) for _ in range(shape.actors)]
    try:
        yield pool
    finally:
        for actor in pool:
            ray.kill(actor)


def torch_device() -> str:
    """The device an actor should use: its own GPU when Ray gave it one, else the CPU."""
    if not ray.get_gpu_ids():
        return "cpu"  # without importing torch: classical-codec actors start faster
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_worker(device: str) -> dict:
    return {"pid": os.getpid(), "device": device, "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def run_on_pool(
    actors: list, tasks: Iterable[Any], submit: Callable[[Any, Any], ray.ObjectRef], in_flight_per_actor: int = 2
) -> Iterator[Any]:
    """Feed tasks to actors, at most `in_flight_per_actor` queued on each, yielding results as they finish.

    Two per actor keep an actor busy while the driver handles the previous result; tasks are pulled
    from `tasks` lazily, so a long listing streams through instead of being submitted all at once.
    """
    tasks = iter(tasks)
    # Round-robin order, so the first tasks spread over all actors instead of queueing on the first.
    idle = deque(actor for _ in range(in_flight_per_actor) for actor in actors)
    running: dict[ray.ObjectRef, Any] = {}
    exhausted = False
    while True:
        while idle and not exhausted:
            task = next(tasks, None)
            if task is None:
                exhausted = True
                break
            actor = idle.popleft()
            running[submit(actor, task)] = actor
        if not running:
            return
        ready, _ = ray.wait(list(running), num_returns=1)
        idle.append(running.pop(ready[0]))
        yield ray.get(ready[0])
