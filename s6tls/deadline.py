"""How long a poll may sleep before a deadline: the one rounding every loop uses."""

import math

# poll takes a C int: a deadline further away is waited for in several sleeps.
MAX_WAIT_MS = 2**31 - 1


def wait_ms(deadline: float | None, now: float) -> int | None:
    """Milliseconds from ``now`` to ``deadline`` (monotonic seconds), for ``poll``.

    Rounded up, so that a loop never wakes before its deadline and spins;
    0 once it has passed; None (wait for ever) when there is no deadline;
    at most ``MAX_WAIT_MS`` (about 24 days), after which the loop, finding
    its deadline still ahead, sleeps again.
    """
    if deadline is None:
        return None
    return min(MAX_WAIT_MS, max(0, math.ceil((deadline - now) * 1000)))


def earliest(*deadlines: float | None) -> float | None:
    """The first of ``deadlines`` that is set, or None."""
    return min((d for d in deadlines if d is not None), default=None)


def after_ms(ms: int, now: float) -> float | None:
    """The deadline ``ms`` milliseconds after ``now``; None for 0, which means no limit."""
    return now + ms / 1000 if ms else None
