"""The AIMD rule of connectors.concurrency, pure, and its limiter's bound on requests in flight."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.connectors.concurrency import LATENCY_SLACK_S, MIN_WINDOW, AdaptiveLimiter, AimdLimit

# One event: a failure of a request sent at the current epoch or an earlier one, or a success
# with a latency (seconds).
events = st.lists(st.one_of(st.tuples(st.just("fail"), st.booleans()),
                            st.tuples(st.just("ok"), st.floats(0.0, 5.0))), max_size=400)


@given(st.integers(1, 300), events)
def test_the_limit_stays_between_one_and_the_maximum(maximum: int, seq: list[tuple[str, object]]) -> None:
    aimd = AimdLimit(maximum)
    for kind, arg in seq:
        if kind == "fail":
            aimd.failed(aimd.epoch if arg else aimd.epoch - 1)
        else:
            assert isinstance(arg, float)
            aimd.succeeded(arg)
        assert 1 <= aimd.current <= maximum


def clean_window(aimd: AimdLimit, latency: float = 0.02) -> None:
    for _ in range(max(MIN_WINDOW, aimd.current)):
        aimd.succeeded(latency)


def test_a_429_halves_once_per_epoch_and_clean_windows_grow_it_back_to_the_maximum() -> None:
    aimd = AimdLimit(52)
    clean_window(aimd)
    assert aimd.current == 52
    sent_before = aimd.epoch
    aimd.failed(sent_before)
    assert aimd.current == 26
    for _ in range(10):  # requests already in flight under the old limit: no further cut
        aimd.failed(sent_before)
    assert aimd.current == 26
    aimd.failed(aimd.epoch)  # sent after the cut, and throttled too
    assert aimd.current == 13
    windows = 0
    while aimd.current < 52:
        clean_window(aimd)
        windows += 1
    assert windows == 52 - 13  # one more per clean window
    clean_window(aimd)
    assert aimd.current == 52  # never above


def test_rising_latency_cuts_and_flat_latency_does_not() -> None:
    aimd = AimdLimit(40, initial=20)
    for _ in range(5):
        clean_window(aimd, 0.020)
    assert aimd.current == 25
    clean_window(aimd, 0.020 + LATENCY_SLACK_S / 2)  # noise: under the slack
    assert aimd.current == 26
    clean_window(aimd, 0.200)  # ten times the usual: the service is queueing
    assert aimd.current < 26


async def test_the_limiter_never_lets_more_than_its_limit_in_flight() -> None:
    limiter = AdaptiveLimiter(6)
    rng = random.Random(3)
    peak = 0
    order: list[int] = []

    async def request(i: int) -> None:
        nonlocal peak
        epoch = await limiter.acquire()
        try:
            peak = max(peak, limiter.in_flight)
            assert limiter.in_flight <= limiter.maximum
            order.append(i)
            await asyncio.sleep(rng.random() / 1000)
            if rng.random() < 0.1:
                limiter.failed(epoch)
            else:
                limiter.succeeded(0.001)
        finally:
            limiter.release()

    tasks = [asyncio.create_task(request(i)) for i in range(300)]
    tasks[5].cancel()  # a request cancelled while it waits gives its turn on
    await asyncio.gather(*tasks, return_exceptions=True)
    assert peak == 6 and limiter.in_flight == 0 and len(order) == 299


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.lists(st.booleans(), min_size=1, max_size=60))
def test_after_a_cut_the_requests_in_flight_drain_below_the_new_limit(maximum: int, fails: list[bool]) -> None:
    async def scenario() -> None:
        limiter = AdaptiveLimiter(maximum)
        over = 0

        async def request(fail: bool) -> None:
            nonlocal over
            epoch = await limiter.acquire()
            over = max(over, limiter.in_flight - limiter.maximum)
            await asyncio.sleep(0)
            if fail:
                limiter.failed(epoch)
            else:
                limiter.succeeded(0.001)
            limiter.release()

        await asyncio.gather(*(request(f) for f in fails))
        assert over <= 0 and limiter.in_flight == 0 and 1 <= limiter.current <= maximum

    asyncio.run(scenario())
