"""Tests of devices.clock: virtual clock, timer ordering, catch-up bound."""

import pytest
from hypothesis import given, settings, strategies as st

from vmlab.devices.clock import Clock, ManualClock, TimerQueue
from vmlab.devices.errors import DeviceError


def test_clock_now_reads_source():
    t = [5]
    clock = Clock(lambda: t[0])
    assert clock.now_ns() == 5
    t[0] = 42
    assert clock.now_ns() == 42


def test_clock_source_going_backwards_clamped():
    t = [100]
    clock = Clock(lambda: t[0])
    clock.now_ns()
    t[0] = 50
    assert clock.now_ns() == 100


def test_manual_clock_advance_backwards_rejected():
    clock = ManualClock(10)
    assert clock.advance(5) == 15
    with pytest.raises(DeviceError):
        clock.advance(-1)


def test_timer_queue_fires_in_deadline_order():
    q = TimerQueue()
    fired = []
    for name, deadline in (("c", 30), ("a", 10), ("b", 20)):
        q.timer(lambda d, n=name: fired.append((n, d))).arm(deadline)
    assert q.next_deadline() == 10
    assert q.run_expired(25) == 2
    assert fired == [("a", 10), ("b", 20)]
    assert q.next_deadline() == 30


def test_timer_queue_equal_deadlines_fire_in_arming_order():
    q = TimerQueue()
    fired = []
    for name in "xyz":
        q.timer(lambda d, n=name: fired.append(n)).arm(7)
    q.run_expired(7)
    assert fired == ["x", "y", "z"]


def test_timer_cancel_prevents_firing():
    q = TimerQueue()
    fired = []
    t = q.timer(fired.append)
    t.arm(10)
    assert t.armed
    t.cancel()
    assert not t.armed
    assert q.next_deadline() is None
    assert q.run_expired(100) == 0 and fired == []


def test_timer_rearm_replaces_previous_deadline():
    q = TimerQueue()
    fired = []
    t = q.timer(fired.append)
    t.arm(10)
    t.arm(50)
    assert q.next_deadline() == 50
    q.run_expired(20)
    assert fired == []
    q.run_expired(50)
    assert fired == [50]


def test_timer_periodic_rearm_from_callback_fires_each_period():
    q = TimerQueue()
    fired = []

    def tick(deadline):
        fired.append(deadline)
        t.arm(deadline + 100)

    t = q.timer(tick)
    t.arm(100)
    q.run_expired(450)
    assert fired == [100, 200, 300, 400]
    assert t.deadline == 500


def test_timer_runaway_rearm_in_past_bounded_per_call():
    q = TimerQueue(max_firings=16)
    count = [0]

    def runaway(deadline):
        count[0] += 1
        t.arm(deadline)  # same instant again: would loop forever

    t = q.timer(runaway)
    t.arm(0)
    assert q.run_expired(10) == 16
    assert count[0] == 16
    assert t.armed


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1000),
                          st.booleans()), max_size=60),
       st.integers(0, 1000))
def test_timer_queue_random_arm_cancel_fires_due_in_order(ops, now):
    q = TimerQueue()
    fired = []
    timers = [q.timer(lambda d, i=i: fired.append((d, i))) for i in range(8)]
    expected = {}
    for i, deadline, cancel in ops:
        if cancel:
            timers[i].cancel()
            expected.pop(i, None)
        else:
            timers[i].arm(deadline)
            expected[i] = deadline
    q.run_expired(now)
    due = {i: d for i, d in expected.items() if d <= now}
    assert sorted(i for _, i in fired) == sorted(due)
    assert [d for d, _ in fired] == sorted(due.values())
    remaining = [d for i, d in expected.items() if d > now]
    assert q.next_deadline() == (min(remaining) if remaining else None)
