"""A minimal Faust app for the worker smoke test (not a test module itself).

Run by tests/integration/test_faust_smoke.py as a real worker process:

    faust -A faust_smoke_app worker -l info --web-port N

Its broker, topics and data directory come from the environment, so each test
run uses fresh topics.
"""

import os

import faust


class Text(faust.Record, serializer="json"):
    id: int
    text: str


class Shouted(faust.Record, serializer="json"):
    id: int
    text: str
    length: int


app = faust.App(
    os.environ["SMOKE_APP_ID"],
    broker=os.environ["SMOKE_BROKER"],
    store="memory://",
    datadir=os.environ["SMOKE_DATADIR"],
    topic_partitions=4,
    consumer_auto_offset_reset="earliest",  # messages produced before the worker joined count too
)
texts = app.topic(os.environ["SMOKE_IN"], key_type=str, value_type=Text)
shouted = app.topic(os.environ["SMOKE_OUT"], key_type=str, value_type=Shouted)


@app.agent(texts)
async def shout(stream):
    async for key, text in stream.items():
        await shouted.send(key=key, value=Shouted(id=text.id, text=text.text.upper(), length=len(text.text)))
