"""``pgkd worker <role>``: run one streaming worker in this process; ``pgkd topics create``.

The same workers run as ``faust -A streams.<module> worker`` (``classify``,
``teacher_agent``, ``curator``, ``trainer``); this entry point checks the settings
first, so a bad ``PGKD_*`` variable is one line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys

# role -> (module holding the Faust ``app``, help)
ROLES = {
    "classify": ("streams.classify", "classify texts.in into labels.out; low confidence -> teacher.requests"),
    "teacher": ("streams.teacher_agent", "label teacher.requests with the LLM teacher (cache, rate limit, budget)"),
    "curator": ("streams.curator", "teacher.labels -> training samples; a retrain request per full batch"),
    "trainer": ("streams.trainer", "retrain.requests -> retrain, validation gate, registry, model.updates"),
}


def add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``worker classify|teacher|curator|trainer`` on the ``pgkd`` parser."""
    parser = subparsers.add_parser(
        "worker",
        help="run a streaming worker (Faust); configured by PGKD_* variables",
        description="Run a streaming worker in the foreground until SIGTERM/SIGINT. "
        "Every setting is a PGKD_* environment variable (docs/CONFIG.md).",
    )
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, (_module, help_text) in ROLES.items():
        sub = roles.add_parser(role, help=help_text)
        sub.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """Import the role's module (which builds its App from the environment) and run a Faust worker."""
    from pgkd.settings import load_settings

    settings = load_settings()  # ConfigError here: the CLI prints one line and exits 2
    module = importlib.import_module(ROLES[args.role][0])
    worker = module.app.Worker(loglevel=settings.log_level, redirect_stdouts=False)
    worker.execute_from_commandline()  # returns only by SystemExit, with the worker's exit code
    return 0


def add_topics_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pgkd topics create`` on the ``pgkd`` parser."""
    parser = subparsers.add_parser(
        "topics", help="create the product's Kafka topics (before producers and workers start)",
        description="The product's Kafka topics (docs/TOPICS.md); names, partitions and replication from "
        "PGKD_* settings.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="create the missing topics (labels.out compacted); exit 1 when one exists with another "
        "cleanup.policy than the product needs",
    )
    create.add_argument("--timeout-s", type=float, default=60.0,
                        help="how long to wait for the broker and every partition's leader (default 60)")
    create.set_defaults(func=run_topics_create)


def run_topics_create(args: argparse.Namespace) -> int:
    """Create what is missing, print one line per topic, and one error line per topic
    the product cannot rely on as it is (it is never altered here)."""
    from pgkd.settings import load_settings
    from pgkd.errors import TopicError, first_line
    from streams.topics import ensure_topics

    settings = load_settings()
    if not args.verbose:  # aiokafka logs each failed connection: the one line below says it
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        states = asyncio.run(asyncio.wait_for(ensure_topics(settings, timeout_s=args.timeout_s), args.timeout_s))
    except TopicError:
        raise
    except (TimeoutError, asyncio.TimeoutError):
        raise TopicError(f"no answer from Kafka at {settings.kafka_bootstrap} within {args.timeout_s:g} s") from None
    except Exception as err:  # noqa: BLE001 - unreachable broker, refused credentials: one line, not a traceback
        reason = first_line(err)
        reason = reason if reason.startswith(type(err).__name__) else f"{type(err).__name__}: {reason}"
        raise TopicError(f"Kafka at {settings.kafka_bootstrap}: {reason}") from None
    for state in states:
        print(f"{state.name}\t{'created' if state.created else 'exists'}\t{state.partitions} partitions\t"
              f"cleanup.policy={state.cleanup_policy}")
    problems = [problem for state in states if (problem := state.problem()) is not None]
    for problem in problems:
        print(f"pgkd: error: {problem}", file=sys.stderr)
    return 1 if problems else 0
