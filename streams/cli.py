"""``pgkd worker <role>``: run one streaming worker in this process.

The same workers run as ``faust -A streams.<module> worker`` (``classify``,
``teacher_agent``, ``curator``, ``trainer``); this entry point checks the settings
first, so a bad ``PGKD_*`` variable is one line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib

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
