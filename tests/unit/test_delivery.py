"""At-least-once batching: a batch is acked only after its handler returned
(the handler returns after the broker acked its outputs), never when it failed."""

import asyncio
from types import SimpleNamespace

from streams.delivery import EXIT_BATCH_FAILED, run_batches


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
