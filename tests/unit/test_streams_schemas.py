"""Records on the wire, the topic factory and the worker CLI, without a broker."""

import base64
import json
import os
import subprocess
import sys

from pgkd.settings import Settings
from streams.app import build_app, declare_topics
from streams.schemas import DeadLetter, LabelOut, TeacherRequest


def test_records_are_plain_json_without_faust_metadata():
    out = LabelOut(id="a1", label="card_lost", confidence=0.91, top_k=[["card_lost", 0.91]], model_version="v3",
                   source="student", needs_review=False, ts=1.5, extra={"lang": "en"})
    obj = json.loads(out.dumps())
    assert obj == {"id": "a1", "label": "card_lost", "confidence": 0.91, "top_k": [["card_lost", 0.91]],
                   "model_version": "v3", "source": "student", "needs_review": False, "ts": 1.5,
                   "extra": {"lang": "en"}, "teacher_model": None}


def test_dead_letter_keeps_original_bytes_cut_to_the_limit():
    raw = b"\xff" * 10
    letter = DeadLetter.of(stage="parse", reason="not_utf8", error="x" * 5000, topic="texts.in", partition=2,
                           offset=7, value=raw, ts=3.0, max_original_bytes=4)
    obj = json.loads(letter.dumps())
    assert base64.b64decode(obj["original_b64"]) == raw[:4]
    assert (obj["original_size"], obj["original_truncated"]) == (10, True)
    assert len(obj["error"]) == 1000
    assert letter.key() == "texts.in:2:7"
    with_id = DeadLetter.of(stage="parse", reason="empty_text", error="e", topic="t", partition=0, offset=0,
                            value=None, ts=0.0, max_original_bytes=4, id="abc")
    assert with_id.key() == "abc" and with_id.original_size == 0


def test_teacher_requests_round_trip_and_bad_ones_are_named():
    request = TeacherRequest(id="a", text="where is my card", student_label="card_arrival", student_confidence=0.2,
                             top_k=[["card_arrival", 0.2]], model_version="v1", ts=1.0, extra={})
    assert TeacherRequest.parse(request.dumps()) == request
    assert TeacherRequest.parse(b"\xff").startswith("unreadable teacher request")
    assert TeacherRequest.parse(b"[]") == "expected a JSON object, got list"
    assert "missing 6 required" in TeacherRequest.parse(b'{"id": "a", "text": "t"}')
    bad_id = json.loads(request.dumps()) | {"id": 5}
    assert "needs a string id" in TeacherRequest.parse(json.dumps(bad_id).encode())


def test_every_topic_comes_from_settings(tmp_path):
    settings = Settings(topic_texts_in="in.x", topic_labels_out="out.x", topic_partitions=6, topic_replication=3,
                        app_id_prefix="unit", faust_datadir=tmp_path)
    app = build_app(settings, "classify")
    topics = declare_topics(app, settings)
    assert app.conf.id == "unit-classify"
    assert app.conf.producer_acks == -1 and app.conf.consumer_auto_offset_reset == "earliest"
    assert not app.conf.web_enabled
    assert topics.texts_in.get_topic_name() == "in.x" and topics.labels_out.get_topic_name() == "out.x"
    assert (topics.dlq.partitions, topics.dlq.replicas) == (6, 3)
    assert topics.labels_out.compacting and not topics.texts_in.compacting


def test_every_worker_consumes_through_the_transport_that_rewinds_uncommitted_partitions(tmp_path):
    from streams.transport import _ConsumerThread

    app = build_app(Settings(app_id_prefix="unit", faust_datadir=tmp_path), "classify")
    assert isinstance(app.consumer._thread, _ConsumerThread)  # its seek_to_committed: streams.transport


def test_worker_cli_reports_a_bad_setting_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")} | {"PGKD_BATCH_SIZE": "0"}
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", "worker", "classify"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pgkd: error: invalid setting PGKD_BATCH_SIZE: Input should be greater than or equal to 1"
    ]


def test_worker_cli_needs_a_model_to_serve():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")}
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", "worker", "teacher"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "PGKD_SERVE_MODEL is not set" in done.stderr
