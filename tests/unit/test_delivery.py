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
