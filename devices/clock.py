"""Virtual time for devices: a clock and a queue of one-shot timers.

Devices never read the wall clock. The VMM builds a :class:`Clock` from a
function of guest progress (e.g. executed instructions), so a run is
reproducible; tests drive a :class:`ManualClock`.

Timers are one-shot: a periodic device re-arms its :class:`Timer` from the
callback. The VMM asks :meth:`TimerQueue.next_deadline` how far it may run the
guest, and calls :meth:`TimerQueue.run_expired` when virtual time has reached
it.

Catch-up policy: :meth:`TimerQueue.run_expired` fires due timers in deadline
order (ties in arming order) until none is due or ``max_firings`` callbacks
have run. A callback that keeps re-arming at or before ``now`` (a periodic
timer far behind, or a zero period) is therefore cut off after
``max_firings``; the rest stay queued and fire on the next call, after the
guest has run a little. Devices that model periodic hardware should re-arm
relative to the current time (coalescing missed periods, like QEMU's default
"discard" lost-tick policy) rather than replay every missed period.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

from vmlab.devices.errors import DeviceError

NANOSECONDS_PER_SECOND = 1_000_000_000


class Clock:
    """Monotonic virtual time in nanoseconds.

    ``source`` is a zero-argument callable returning the current virtual time
    in ns. The clock never goes backwards: a source that does (a VMM bug) is
    clamped to the last value returned, so device arithmetic on elapsed time
    stays non-negative.
    """

    def __init__(self, source: Callable[[], int]) -> None:
        self._source = source
        self._last = 0

    def now_ns(self) -> int:
        """Current virtual time in nanoseconds."""
        now = int(self._source())
        if now < self._last:
            return self._last
        self._last = now
        return now


class ManualClock(Clock):
    """A clock whose time only moves when told to (tests, tools)."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns
        super().__init__(lambda: self._now)

    def advance(self, delta_ns: int) -> int:
        """Move time forward by ``delta_ns`` (>= 0); return the new time."""
        if delta_ns < 0:
            raise DeviceError(f"cannot move a clock backwards ({delta_ns} ns)")
        self._now += delta_ns
        return self._now

    def set(self, now_ns: int) -> None:
        """Jump to ``now_ns``, which must not be in the past."""
        if now_ns < self._now:
            raise DeviceError(f"cannot move a clock backwards to {now_ns}")
        self._now = now_ns


class Timer:
    """A one-shot timer on a :class:`TimerQueue`.

    ``callback(deadline_ns)`` runs from :meth:`TimerQueue.run_expired` with the
    deadline the timer was armed for (not the current time), so a periodic
    timer can re-arm at ``deadline_ns + period`` without drift.
    """

    def __init__(self, queue: "TimerQueue", callback: Callable[[int], None],
                 name: str = "") -> None:
        self._queue = queue
        self.callback = callback
        self.name = name
        self._deadline: int | None = None
        # Bumped on every arm/cancel so stale heap entries can be recognised.
        self._generation = 0

    def __repr__(self) -> str:
        return f"Timer({self.name!r}, deadline={self._deadline})"

    @property
    def armed(self) -> bool:
        """True while the timer is waiting to fire."""
        return self._deadline is not None

    @property
    def deadline(self) -> int | None:
        """The time the timer will fire at, or None when not armed."""
        return self._deadline

    def arm(self, deadline_ns: int) -> None:
        """(Re-)arm the timer for ``deadline_ns``; replaces any earlier arming.

        A deadline in the past is allowed: the timer fires on the next
        :meth:`TimerQueue.run_expired`.
        """
        self._generation += 1
        self._deadline = int(deadline_ns)
        self._queue._push(self)

    def cancel(self) -> None:
        """Disarm the timer; a no-op when it is not armed."""
        self._generation += 1
        self._deadline = None


class TimerQueue:
    """Deadline-ordered set of :class:`Timer` objects (a lazy-deletion heap)."""

    def __init__(self, max_firings: int = 256) -> None:
        if max_firings <= 0:
            raise DeviceError("max_firings must be positive")
        self.max_firings = max_firings
        self._heap: list[tuple[int, int, int, Timer]] = []
        #: the heap itself, read-only for the run loop's lean path
        #: (vmm.runloop): ``heap[0][0]`` is what ``peek`` returns
        self.heap = self._heap
        #: the run loop's lean-path context while it runs (vmm/runloop.py): an
        #: object whose ``timer`` is the earliest deadline it runs to; a timer
        #: armed earlier lowers it (``_push``)
        self.watch = None
        self._seq = itertools.count()

    def timer(self, callback: Callable[[int], None], name: str = "") -> Timer:
        """Create an unarmed :class:`Timer` on this queue."""
        return Timer(self, callback, name)

    def _push(self, timer: Timer) -> None:
        assert timer._deadline is not None  # internal invariant, not guest data
        deadline = timer._deadline
        heapq.heappush(self._heap, (deadline, next(self._seq),
                                    timer._generation, timer))
        w = self.watch
        if w is not None and deadline < w.timer:
            w.timer = max(deadline, 0)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            deadline, _, gen, timer = heap[0]
            if gen == timer._generation and timer._deadline == deadline:
                return
            heapq.heappop(heap)

    def next_deadline(self) -> int | None:
        """Earliest deadline of an armed timer, or None."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def peek(self) -> int | None:
        """The earliest deadline in the heap, possibly of a timer since
        disarmed (a deadline that comes early only costs the run loop one
        extra stop); the loop's cheap look at every exit."""
        heap = self._heap
        return heap[0][0] if heap else None

    def due(self, now_ns: int) -> bool:
        """True if a heap entry is due at ``now_ns`` (it may be a stale one that
        ``run_expired`` then drops): the run loop's cheap check at every exit."""
        heap = self._heap
        return bool(heap) and heap[0][0] <= now_ns

    def run_expired(self, now_ns: int) -> int:
        """Fire every timer due at ``now_ns``; return how many fired.

        At most ``max_firings`` callbacks run per call (see the module
        docstring for why); timers still due stay queued.
        """
        fired = 0
        while fired < self.max_firings:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now_ns:
                break
            deadline, _, _, timer = heapq.heappop(self._heap)
            # Disarm before the callback so it can re-arm.
            timer._deadline = None
            timer._generation += 1
            fired += 1
            timer.callback(deadline)
        return fired
