"""The attempts' deadlines: one timer for all, a cancellation turned into TimeoutError for the attempt
that ran out, and nothing else disturbed (a task disarmed in time, another cancel, a new loop)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.engine.deadlines import RESOLUTION, Deadlines


async def attempt(deadlines: Deadlines, seconds: float, work: asyncio.Future[None]) -> str:
    """What dispatch does around an attempt: arm, await, turn the deadline's cancel into a timeout."""
    task = asyncio.current_task()
    assert task is not None
    armed = deadlines.arm(task, seconds)
    try:
        await work
        return "done"
    except asyncio.CancelledError:
        if deadlines.expired(task):
            return "timeout"
        raise
    finally:
        deadlines.disarm(task, armed)


async def test_an_attempt_past_its_deadline_times_out_and_not_before():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await attempt(deadlines, 0.05, loop.create_future()) == "timeout"
    assert loop.time() - started >= 0.05 - 0.001  # never early (the loop's clock may tick in ms)
    assert deadlines.pending() == 0
    assert asyncio.current_task().cancelling() == 0  # the cancellation was taken back


async def test_an_attempt_that_ends_in_time_is_left_alone_and_its_bucket_dropped():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    work = loop.create_future()
    loop.call_soon(work.set_result, None)
    assert await attempt(deadlines, 0.05, work) == "done"
    assert deadlines.pending() == 0 and not deadlines._buckets
    # the timer set for that bucket fires later and finds nothing to cancel
    await asyncio.wait_for(attempt(deadlines, 0.1, loop.create_future()), 5)


async def test_many_attempts_share_one_timer_and_each_runs_out_on_its_own():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    # a later deadline armed first, then earlier ones: the timer follows the earliest
    results = await asyncio.gather(attempt(deadlines, 0.3, loop.create_future()),
                                   attempt(deadlines, 0.05, loop.create_future()),
                                   attempt(deadlines, 0.05, done),
                                   attempt(deadlines, 0.1, loop.create_future()))
    assert results == ["timeout", "timeout", "done", "timeout"]
    assert deadlines.pending() == 0


async def test_another_cancel_stays_a_cancel():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    work = loop.create_future()
    task = asyncio.create_task(attempt(deadlines, RESOLUTION, work))
    await asyncio.sleep(0)  # armed
    task.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.pending() == 0



async def test_a_new_event_loop_starts_afresh():
    deadlines = Deadlines()

    def run_in_own_loop() -> str:
        async def one() -> str:
            return await attempt(deadlines, 0.02, asyncio.get_running_loop().create_future())
        return asyncio.run(one())

    first = await asyncio.to_thread(run_in_own_loop)  # a library user's asyncio.run, then another
    second = await asyncio.to_thread(run_in_own_loop)
    assert first == second == "timeout"
    assert await attempt(deadlines, 0.02, asyncio.get_running_loop().create_future()) == "timeout"
    deadlines.close()
    assert deadlines.pending() == 0


async def test_a_call_falls_due_and_a_deadline_may_be_brought_forward():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    work = loop.create_future()
    task = asyncio.create_task(attempt(deadlines, 30, work))  # a far deadline
    await asyncio.sleep(0)  # armed (and the loop known)
    due = loop.create_future()
    deadlines.call_at("late", 0.02, lambda: (calls.append("late"), due.set_result(None)))
    gone = deadlines.call_at("disarmed", 0.02, lambda: calls.append("disarmed"))
    deadlines.disarm("disarmed", gone)
    await due
    assert calls == ["late"]
    # the attempt is no longer wanted: its deadline is now, and it sees a timeout
    number = next(n for n, bucket in deadlines._buckets.items() if task in bucket)
    assert deadlines.expire_now(task, number)
    assert await task == "timeout"
    assert not deadlines.expire_now(task, number)  # disarmed: nothing to bring forward
