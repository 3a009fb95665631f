"""Time to a target accuracy (``reslab train --target``): the first epoch whose test accuracy
reached it, by the one rule the command line and the benchmarks share."""

from reslab.precision import format_seconds


def target_reached(target: float, history: list[dict]) -> dict | None:
    """The first epoch's record at or above ``target`` percent test accuracy (None without a
    target, or before any epoch reached it)."""
    if not target:
        return None
    return next((r for r in history if 100 * r["test_acc"] >= target), None)


def describe_reach(record: dict) -> str:
    return (
        f"epoch {record['epoch']}, step {record['step']}, "
        f"after {format_seconds(record['elapsed_s'])}"
    )
