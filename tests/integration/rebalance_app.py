"""A Faust app shaped like streams.classify, for test_rebalance_at_startup.py (not a
test module itself): the product's App class (streams.app), an agent that
waits R_DELAY_S (a model load) before it takes batches with
streams.delivery.run_batches, and copies each input to R_OUT.

    faust -A rebalance_app worker -l info --without-web
"""

import asyncio
import os

from streams.app import App
from streams.delivery import run_batches, send

app = App(os.environ["R_APP"], broker=os.environ["R_BROKER"], store="memory://",
          datadir=os.environ["R_DATADIR"], topic_partitions=4, consumer_auto_offset_reset="earliest",
          broker_session_timeout=10, broker_heartbeat_interval=3, topic_disable_leader=True,
          web_enabled=False)
src = app.topic(os.environ["R_IN"], value_type=bytes, value_serializer="raw")
out = app.topic(os.environ["R_OUT"], value_type=bytes, value_serializer="raw", key_serializer="raw")


@app.agent(src)
async def copy(stream):
    await asyncio.sleep(float(os.environ.get("R_DELAY_S", "0")))

    async def handle(batch):
        await asyncio.gather(*(send(out, m.value.decode(), m.value) for m in batch))

    await run_batches(stream, 32, 0.05, handle, "rebalance-test")
