"""The product's topics as ``pgkd topics create`` and the workers' Faust factory make them."""

import doctest
import os
import subprocess
import sys

from pgkd.settings import Settings
from streams import topics
from streams.app import Topics, build_app, declare_topics
from streams.topics import COMPACTED, FIELDS, TopicState, new_topic


def test_docstring_examples():
    result = doctest.testmod(topics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_the_cli_and_the_workers_declare_the_same_topics(tmp_path):
    settings = Settings(topic_labels_out="answers", topic_partitions=6, topic_replication=3, app_id_prefix="unit",
                        faust_datadir=tmp_path)
    declared = declare_topics(build_app(settings, "classify"), settings)
    assert tuple(Topics.__dataclass_fields__) == FIELDS
    for field in FIELDS:
        admin, faust_topic = new_topic(settings, field), getattr(declared, field)
        assert admin.name == faust_topic.get_topic_name() == getattr(settings, f"topic_{field}")
        assert (admin.num_partitions, admin.replication_factor) == (6, 3) == (faust_topic.partitions,
                                                                             faust_topic.replicas)
        compacted = admin.topic_configs.get("cleanup.policy") == "compact"
        assert compacted == bool(faust_topic.compacting) == (field in COMPACTED)
    assert COMPACTED == {"labels_out"}


def test_a_topic_is_a_problem_only_with_another_cleanup_policy_than_the_product_needs():
    assert TopicState("labels_out", "answers", False, 4, "compact").problem() is None
    assert "needs compact" in TopicState("labels_out", "answers", False, 4, "delete").problem()
    # compacting texts.in would silently drop a redelivered id's earlier text
    assert "needs delete" in TopicState("texts_in", "texts.in", False, 4, "compact").problem()


def test_topics_create_without_a_broker_is_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")} | {"PGKD_KAFKA_BOOTSTRAP": "127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", "topics", "create", "--timeout-s", "5"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("pgkd: error: ") and "127.0.0.1:9" in line
