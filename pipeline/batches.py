"""What a job does when a codec call on a batch raises: find the bad item, record it, go on.

Codecs work on batches (a GPU is only busy with several images at once), but one image a codec cannot
handle (too wide for WebP, a payload that does not decode) must cost that image alone, never its batch,
its shard or the job. Encode and decode both feed their batches through `map_batch`.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def failure_reason(exc: BaseException) -> str:
    """The reason written to a failure table: the exception's class, so that it can be searched for, and its text."""
    return f"{type(exc).__name__}: {exc}"


def map_batch(
    items: Sequence[Item],
    function: Callable[[list[Item]], list[Result]],
    record_failure: Callable[[Item, str], None],
) -> list[tuple[Item, Result]]:
    """(item, result) pairs of `function` over the batch, in order, leaving out the items that fail.

    The whole batch is tried first. When that raises, each item is tried alone, and an item that fails
    alone is passed to `record_failure` with its reason. A batch of one that fails is recorded at once:
    trying it alone again would fail the same way. One bad item therefore costs one extra pass over
    its batch; the exception never reaches the caller.
    """
    items = list(items)
    if not items:
        return []
    try:
        return list(zip(items, function(items), strict=True))
    except Exception as exc:
        if len(items) == 1:
            record_failure(items[0], failure_reason(exc))
            return []
    done = []
    for item in items:
        try:
            done.append((item, function([item])[0]))
        except Exception as exc:
            record_failure(item, failure_reason(exc))
    return done
