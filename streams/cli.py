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
        "create", help="create the missing topics (labels.out compacted); exit 1 when labels.out exists "
        "uncompacted, or another topic compacted",
    )
    create.add_argument("--timeout-s", type=float, default=60.0,
                        help="how long to wait for the broker and every partition's leader (default 60)")
    create.set_defaults(func=run_topics_create)


def run_topics_create(args: argparse.Namespace) -> int:
    """Create what is missing, print one line per topic, and one error line per topic
    the product cannot rely on as it is (it is never altered here)."""
    from pgkd.settings import load_settings
    from pgkd.errors import TopicError
    from streams.topics import ensure_topics

    settings = load_settings()
    _quiet_kafka_logs(args)
    try:
        states = asyncio.run(asyncio.wait_for(ensure_topics(settings, timeout_s=args.timeout_s, policies=True), args.timeout_s))
    except TopicError:
        raise
    except (TimeoutError, asyncio.TimeoutError):
        raise TopicError(f"no answer from Kafka at {settings.kafka_bootstrap} within {args.timeout_s:g} s") from None
    except Exception as err:  # noqa: BLE001 - unreachable broker, refused credentials: one line, not a traceback
        raise TopicError(f"Kafka at {settings.kafka_bootstrap}: {_one_line(err)}") from None
    for state in states:
        print(f"{state.name}\t{'created' if state.created else 'exists'}\t{state.partitions} partitions\t"
              f"cleanup.policy={state.cleanup_policy}")
    problems = [problem for state in states if (problem := state.problem()) is not None]
    for problem in problems:
        print(f"pgkd: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def add_dlq_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pgkd dlq summary|replay`` on the ``pgkd`` parser."""
    parser = subparsers.add_parser(
        "dlq", help="count the dead letters of texts.dlq, or replay their originals once the cause is fixed",
        description="The dead-letter topic (docs/TOPICS.md, texts.dlq); replayed letters are marked in Redis "
        "(<prefix>:dlq:replayed) and never sent twice.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    summary = actions.add_parser("summary", help="letters by stage and reason, oldest and newest, how many replayed")
    summary.set_defaults(func=run_dlq)
    replay = actions.add_parser(
        "replay", help="send the selected letters' originals back to the input topic each came from")
    replay.add_argument("--stage", action="append", required=True, choices=("parse", "inference", "teacher", "trainer"),
                        help="the stage whose letters to replay (repeatable)")
    replay.add_argument("--reason", action="append", default=None,
                        help="only letters with this reason, e.g. timeout or connection (repeatable; default: all)")
    replay.add_argument("--dry-run", action="store_true", help="count what would be sent; send and mark nothing")
    replay.set_defaults(func=run_dlq)


def run_dlq(args: argparse.Namespace) -> int:
    from pgkd.errors import DeadLetterError
    from pgkd.settings import load_settings
    from pgkd.teacher_cache import connect
    from streams import dlq

    settings = load_settings()
    _quiet_kafka_logs(args)

    async def run() -> int:
        redis = connect(settings.redis_url.get_secret_value(), max(5.0, settings.redis_timeout_s))
        try:
            if args.action == "summary":
                for line in (await dlq.summarize(settings, redis)).lines():
                    print(line)
                return 0
            sent, skipped = await dlq.replay(settings, redis, set(args.stage), set(args.reason or ()), args.dry_run)
        finally:
            await redis.aclose()
        verb = "would replay" if args.dry_run else "replayed"
        print(f"{verb} {sum(sent.values())} letter(s)" + "".join(f"; {n} to {t}" for t, n in sorted(sent.items())))
        for why, n in sorted(skipped.items()):
            print(f"skipped {n}: {why}")
        return 0

    try:
        return asyncio.run(run())
    except Exception as err:  # noqa: BLE001 - an unreachable broker or Redis, refused credentials: one line
        if args.verbose:
            raise
        raise DeadLetterError(f"dlq {args.action}: {_one_line(err)} (-v for the traceback)") from None


def _quiet_kafka_logs(args: argparse.Namespace) -> None:
    """aiokafka logs every failed connection: a command says it in one line instead (``-v`` shows them)."""
    if not args.verbose:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _one_line(err: BaseException) -> str:
    """``Type: first line`` of a third-party error, without the type twice."""
    from pgkd.errors import first_line

    reason = first_line(err)
    return reason if reason.startswith(type(err).__name__) else f"{type(err).__name__}: {reason}"
