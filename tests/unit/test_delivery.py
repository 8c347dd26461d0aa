"""At-least-once batching: a batch is acked only after its handler returned
(the handler returns after the broker acked its outputs), never when it failed."""

import asyncio
import contextlib
import time
from types import SimpleNamespace

import pytest

from streams.delivery import EXIT_BATCH_FAILED, read_ahead, run_batches


class FakeStream:
    """What run_batches uses of a Faust stream: noack_take() and ack()."""

    def __init__(self, batches):
        self.batches = batches
        self.log: list[str] = []

    async def noack_take(self, size, within):
        for batch in self.batches:
            yield [self._event(offset) for offset in batch]

    @staticmethod
    def _event(offset):
        message = SimpleNamespace(topic="texts.in", partition=0, offset=offset, timestamp=1.0)
        return SimpleNamespace(message=message, value=b"{}")

    async def ack(self, event):
        self.log.append(f"ack {event.message.offset}")


def test_events_are_acked_after_the_handler_returns():
    stream = FakeStream([[0, 1], [2]])

    async def handle(batch):
        stream.log.append(f"start {[m.offset for m in batch]}")
        await asyncio.sleep(0)  # the sends are awaited here
        stream.log.append("sent")

    asyncio.run(run_batches(stream, 2, 0.1, handle, "test"))
    assert stream.log == ["start [0, 1]", "sent", "ack 0", "ack 1", "start [2]", "sent", "ack 2"]


def test_a_failed_batch_is_not_acked_and_the_worker_exits():
    stream = FakeStream([[0, 1], [2]])
    exits: list[int] = []

    async def handle(batch):
        if batch[0].offset == 2:
            raise RuntimeError("producer gave up")

    asyncio.run(run_batches(stream, 2, 0.1, handle, "test", exit=exits.append))
    assert stream.log == ["ack 0", "ack 1"]
    assert exits == [EXIT_BATCH_FAILED]


# --- pipelined handlers (the classifier): the next batch runs while the last one's acks arrive ----


def test_pipelined_batches_overlap_and_are_acked_in_order_after_their_records_are_stored():
    stream = FakeStream([[0], [1], [2]])
    stored: dict[int, asyncio.Future] = {}

    async def handle(batch):
        offset = batch[0].offset
        stream.log.append(f"handle {offset}")
        if offset >= 1:  # batch k's acks come in while batch k+1 is handled
            stream.log.append(f"stored {offset - 1}")
            stored[offset - 1].set_result(None)
        stored[offset] = asyncio.get_running_loop().create_future()
        return stored[offset]

    async def main():
        task = asyncio.ensure_future(run_batches(stream, 1, 0.1, handle, "test"))
        while 2 not in stored:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert "ack 2" not in stream.log  # not stored yet: not acked
        stream.log.append("stored 2")
        stored[2].set_result(None)
        await task

    asyncio.run(main())
    assert stream.log == ["handle 0", "handle 1", "stored 0", "ack 0", "handle 2", "stored 1", "ack 1",
                          "stored 2", "ack 2"]


def test_a_pipelined_batch_whose_records_fail_is_not_acked_nor_any_after_it():
    stream = FakeStream([[0], [1], [2]])
    exits: list[int] = []

    async def handle(batch):
        future = asyncio.get_running_loop().create_future()
        if batch[0].offset == 1:
            future.set_exception(RuntimeError("producer gave up"))
        else:
            future.set_result(None)
        return future

    asyncio.run(run_batches(stream, 1, 0.1, handle, "test", exit=exits.append))
    assert stream.log == ["ack 0"]
    assert exits == [EXIT_BATCH_FAILED]


def test_the_last_pipelined_batch_is_acked_without_waiting_for_another():
    """A quiet stream must not leave its last batch unacknowledged (the lag would never reach zero)."""
    stream = FakeStream([[0, 1]])
    forever = asyncio.Event()

    async def noack_take(size, within):
        yield [stream._event(0), stream._event(1)]
        await forever.wait()  # no more input, like a real stream

    stream.noack_take = noack_take

    async def handle(batch):
        return asyncio.ensure_future(asyncio.sleep(0.01))

    async def main():
        task = asyncio.ensure_future(run_batches(stream, 2, 0.1, handle, "test"))
        for _ in range(100):
            if stream.log == ["ack 0", "ack 1"]:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return list(stream.log)

    assert asyncio.run(main()) == ["ack 0", "ack 1"]


# --- reading ahead: the next batch is what gathered while the handler worked --------------------


async def _takes(batches, pulled=None, error=None):
    for batch in batches:
        if pulled is not None:
            pulled.append(batch)
        yield batch
        await asyncio.sleep(0)
    if error is not None:
        raise error
    await asyncio.Event().wait()  # a real stream does not end; the caller closes it


def _collect(takes, size, handler_s=0.0, n=None):
    async def main():
        out = []
        async with contextlib.aclosing(read_ahead(takes, size)) as batches:
            async for batch in batches:
                out.append(batch)
                if n is not None and sum(map(len, out)) >= n:
                    break
                await asyncio.sleep(handler_s)  # the handler at work
        return out

    return asyncio.run(main())


def test_read_ahead_hands_over_what_gathered_meanwhile_in_order_never_more_than_size():
    takes = [[0], [1], [2], [3, 4], [5], [6, 7, 8, 9], [10]]
    out = _collect(_takes(takes), size=4, handler_s=0.05, n=11)
    assert [e for batch in out for e in batch] == list(range(11))  # every event once, in order
    assert all(0 < len(batch) <= 4 for batch in out)
    assert out[0] == [0] and len(out[1]) == 4  # the first alone; the second: all that came while it was handled


def test_read_ahead_pauses_the_reader_while_size_events_wait():
    pulled: list = []
    endless = ([i] for i in range(10**6))
    _collect(_takes(endless, pulled), size=3, handler_s=0.05, n=6)
    assert len(pulled) <= 3 * 2 + 1  # two batches handed over, at most one full batch waiting, one take in hand


def test_read_ahead_raises_the_error_of_the_stream_after_the_batches_before_it():
    out = []

    async def main():
        async for batch in read_ahead(_takes([[0], [1]], error=RuntimeError("consumer crashed")), 4):
            out.append(batch)

    with pytest.raises(RuntimeError, match="consumer crashed"):
        asyncio.run(main())
    assert [e for batch in out for e in batch] == [0, 1]


def test_read_ahead_closes_the_stream_when_the_caller_stops():
    closed = []

    async def takes():
        try:
            yield [0]
            await asyncio.Event().wait()
        finally:
            closed.append(True)  # Faust's take restores the stream's acks here

    _collect(takes(), size=2, n=1)
    assert closed == [True]


class CommittingConsumer:
    def __init__(self, fails=None, takes_s=0.0):
        self.fails, self.takes_s, self.calls = fails, takes_s, []

    async def commit_acked(self):
        self.calls.append("commit")
        await asyncio.sleep(self.takes_s)
        if self.fails:
            raise self.fails


@pytest.mark.parametrize("consumer", [CommittingConsumer(), CommittingConsumer(fails=ConnectionError("broker away")),
                                      CommittingConsumer(takes_s=5.0)], ids=["commits", "fails", "too slow"])
def test_commit_then_exit_commits_what_was_acked_then_exits_whatever_the_commit_does(consumer):
    from streams.delivery import commit_then_exit

    done = []
    started = time.monotonic()
    asyncio.run(commit_then_exit(consumer, 75, lambda code: done.append((consumer.calls[:], code)), timeout_s=0.2))
    assert done == [(["commit"], 75)]  # the commit was asked for before the exit, and the exit came
    assert time.monotonic() - started < 2  # a slow commit does not hold the exit
