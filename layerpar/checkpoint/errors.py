"""The checkpoint error and the one-line messages every rank raises."""

__all__ = ["CheckpointError", "one_line", "message", "ranges", "intervals"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read, verified or used by this run."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def message(exc: BaseException, context: str) -> str:
    """A CheckpointError's own line, anything else after ``context``."""
    if isinstance(exc, CheckpointError):
        return one_line(exc)
    return f"{context}: {type(exc).__name__}: {one_line(exc)}"


def intervals(nums) -> list:
    """Sorted integers as half-open runs [[lo, hi), ...]."""
    out = []
    for n in sorted(nums):
        if out and out[-1][1] == n:
            out[-1][1] = n + 1
        elif not out or out[-1][1] < n:
            out.append([n, n + 1])
    return out


def ranges(nums) -> str:
    """Integers as "0-3,5,7-9" (at most ten runs shown)."""
    out = [str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}" for lo, hi in intervals(nums)]
    return ",".join(out[:10]) + (",..." if len(out) > 10 else "")
