"""``pgkd models ...``: the operator's view of the model registry.

list | show V | promote V | rollback | rounds | history | import DIR [--promote] [--onnx Q]

Settings come from the environment (``PGKD_MODEL_STORE``, ``PGKD_REDIS_URL``,
``PGKD_APP_ID_PREFIX``). Errors are one line and exit 2 (``pgkd.cli.main``).
After a promote or rollback the change is announced on ``model.updates`` through
``streams.announce.announce_model_update(settings, entry)`` when that module is
installed; the pointer in Redis is what counts, the announcement only tells
running classifier workers to swap now. The commands that hash a version's files
run at a lower CPU priority (:data:`pgkd.priority.ADMIN_NICE`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
from datetime import UTC, datetime

from pgkd.errors import ModelIntegrityError
from pgkd.priority import ADMIN_NICE, lower_thread_priority
from pgkd.registry import Registry, stored_graphs
from pgkd.serving import graphs_to_publish
from pgkd.settings import Settings, load_settings

log = logging.getLogger(__name__)


def add_models_parser(sub) -> None:
    """Add ``pgkd models`` and its subcommands to the ``pgkd`` parser."""
    models = sub.add_parser("models", help="the model registry: list, show, promote, rollback, rounds, import")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    p = msub.add_parser("list", help="stored versions, the current one marked *")
    p.add_argument("--json", action="store_true", help="one JSON object per version")
    p.set_defaults(func=cmd_list)

    p = msub.add_parser("show", help="a version's manifest and whether its files match their checksums")
    p.add_argument("version")
    p.set_defaults(func=cmd_show)

    p = msub.add_parser("promote", help="make a stored version current (verified first)")
    p.add_argument("version")
    p.add_argument("--reason", default="operator promote")
    p.set_defaults(func=cmd_promote)

    p = msub.add_parser("rollback", help="make current again the version that was current before")
    p.add_argument("--reason", default="operator rollback")
    p.set_defaults(func=cmd_rollback)

    p = msub.add_parser("rounds", help="retrain rounds: outcome, macro-F1 of both versions, gate decision")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="the records as JSON lines")
    p.set_defaults(func=cmd_rounds)

    p = msub.add_parser("history", help="promotions and rollbacks, oldest first")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_history)

    p = msub.add_parser("import", help="publish a directory written by pgkd train/distill as a new version")
    p.add_argument("dir", help="e.g. runs/x/model (a report.json beside it supplies the metrics)")
    p.add_argument("--promote", action="store_true", help="also make it current")
    p.add_argument("--reason", default=None, help="reason recorded with --promote")
    p.add_argument("--onnx", choices=("auto", "none", "fp32", "int8"), default="auto",
                   help="ONNX Runtime graph to build and store with the version, so workers load it instead of "
                   "building it (auto: the one PGKD_INFERENCE_GRAPH/PGKD_INFERENCE_QUANTIZE serve, if onnxruntime)")
    p.set_defaults(func=cmd_import)


# --- commands -------------------------------------------------------------------


def _yield_cpu() -> None:
    """Run the rest of this command at nice +ADMIN_NICE: the commands that hash a
    version (show, promote, rollback, import) take what the serving workers on the
    same host leave, rather than stalling their answers (pgkd.priority)."""
    lower_thread_priority(ADMIN_NICE)


def cmd_list(args) -> int:
    settings = load_settings()
    with Registry.from_settings(settings) as registry:
        current = registry.current()
        rows = [_summary(registry, v, current) for v in registry.versions()]
        store = registry.store
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if rows:
        print(_table(["", "version", "round", "macro_f1", "accuracy", "parent", "graphs", "created_at"],
                     [["*" if r["current"] else "", r["version"], _num(r["round"]), _f4(r["macro_f1"]),
                       _f4(r["accuracy"]), r["parent"] or "-", ",".join(r["graphs"]) or "-",
                       r["created_at"] or r.get("problem", "-")]
                      for r in rows]))
    else:
        print(f"no versions in the model store {store}")
    if current is None:
        print("current: none (make one current with: pgkd models promote VERSION)")
    elif current not in {r["version"] for r in rows}:
        print(f"current: {current} (NOT in the model store {store}: check PGKD_MODEL_STORE)")
    else:
        print(f"current: {current}")
    return 0


def cmd_show(args) -> int:
    _yield_cpu()
    settings = load_settings()
    with Registry.from_settings(settings) as registry:
        manifest = registry.manifest(args.version)  # unknown version / unreadable manifest: one line, exit 2
        try:
            registry.verify(args.version)
            problem = None
        except ModelIntegrityError as err:
            problem = str(err)
        current = registry.current()
    shown = {"version": args.version, "current": args.version == current, "verified": problem is None,
             "problem": problem, "manifest": manifest}
    print(json.dumps(shown, indent=2))
    return 0 if problem is None else 1


def cmd_promote(args) -> int:
    _yield_cpu()
    settings = load_settings()
    with Registry.from_settings(settings) as registry:
        entry = registry.promote(args.version, reason=args.reason)
    print(f"promoted {entry['version']} (previous {entry['previous'] or 'none'}): {entry['reason']}")
    return _announce(settings, entry)


def cmd_rollback(args) -> int:
    _yield_cpu()
    settings = load_settings()
    with Registry.from_settings(settings) as registry:
        entry = registry.rollback(reason=args.reason)
    print(f"rolled back to {entry['version']} (previous {entry['previous']}): {entry['reason']}")
    return _announce(settings, entry)


def cmd_rounds(args) -> int:
    settings = load_settings()
    with Registry.from_settings(settings) as registry:
        records = registry.rounds(args.limit)
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    if not records:
        print("no retrain rounds recorded")
        return 0
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        rows.append([
            _num(r.get("round")), r.get("outcome", "-"), r.get("candidate") or "-", r.get("current") or "-",
            _f4((metrics.get("candidate") or {}).get("macro_f1")), _f4((metrics.get("current") or {}).get("macro_f1")),
            _when(r.get("ts")), _gate_text(r),
        ])
    print(_table(["round", "outcome", "candidate", "current", "cand_f1", "curr_f1", "when", "gate"], rows))
    return 0


def cmd_history(args) -> int:
    settings = load_settings()
    with Registry.from_settings(settings) as registry:
        entries = registry.history(args.limit)
    if not entries:
        print("no promotions yet")
        return 0
    print(_table(["when", "action", "version", "previous", "round", "reason"],
                 [[_when(e.get("ts")), e["action"], e["version"], e.get("previous") or "-", _num(e.get("round")),
                   e.get("reason") or ""] for e in entries]))
    return 0


def cmd_import(args) -> int:
    _yield_cpu()
    settings = load_settings()
    with Registry.from_settings(settings) as registry:
        registry.current()  # fail on an unreachable Redis before the slow part
        graphs = graphs_to_publish(settings) if args.onnx == "auto" else () if args.onnx == "none" else (args.onnx,)
        version = registry.import_dir(args.dir, graphs=graphs)
        stored = stored_graphs(registry.manifest(version))
        print(f"imported {args.dir} as {version} in {registry.store}"
              + (f" with the {'/'.join(stored)} ONNX graph" if stored else ""))
        missing = sorted(set(graphs) - set(stored))
        if missing:
            print(f"warning: the {'/'.join(missing)} ONNX graph could not be built (see the log); "
                  "workers serving it build their own", file=sys.stderr)
        if not args.promote:
            return 0
        entry = registry.promote(version, reason=args.reason or f"import of {args.dir}", round=0)
    print(f"promoted {entry['version']} (previous {entry['previous'] or 'none'}): {entry['reason']}")
    return _announce(settings, entry)


# --- the announcement hook ----------------------------------------------------------


def _announce(settings: Settings, entry: dict) -> int:
    """Tell running classifier workers through ``model.updates``, when the
    streams package provides the announcer. The pointer already moved: a failure
    here is reported (exit 1), not undone; workers that start later read the pointer."""
    try:
        from streams.announce import announce_model_update
    except ModuleNotFoundError as err:
        if err.name not in ("streams", "streams.announce"):
            raise
        log.warning("streams.announce is not installed: %s is current but was not announced on model.updates; "
                    "classifier workers serve it after a restart", entry["version"])
        return 0
    try:
        result = announce_model_update(settings, entry)
        if inspect.iscoroutine(result):
            asyncio.run(result)
    except Exception as err:  # noqa: BLE001 - any failure: the promotion stands, say so in one line
        print(f"pgkd: error: {entry['version']} is current, but announcing it on model.updates failed "
              f"({type(err).__name__}: {err}); classifier workers serve it after a restart", file=sys.stderr)
        return 1
    return 0


# --- formatting -----------------------------------------------------------------


def _summary(registry: Registry, version: str, current: str | None) -> dict:
    row = {"version": version, "current": version == current, "round": None, "macro_f1": None, "accuracy": None,
           "parent": None, "graphs": [], "created_at": None}
    try:
        manifest = registry.manifest(version)
    except ModelIntegrityError as err:
        return {**row, "problem": str(err)}
    metrics = manifest.get("metrics") or {}
    return {**row, "round": manifest.get("round"), "macro_f1": metrics.get("macro_f1"),
            "accuracy": metrics.get("accuracy"), "parent": manifest.get("parent"),
            "graphs": stored_graphs(manifest),  # prebuilt ONNX Runtime graphs: a worker loads them instead of building
            "created_at": manifest.get("created_at")}


def _gate_text(record: dict) -> str:
    gate = record.get("gate") or {}
    if record.get("outcome") == "failed":
        return f"failed: {record.get('error') or record.get('reason') or 'no error recorded'}"
    if gate.get("passed"):
        margins = gate.get("margins") or {}
        return f"passed (macro-F1 {_signed(margins.get('macro_f1'))}, accuracy {_signed(margins.get('accuracy'))})"
    return "; ".join(gate.get("reasons") or []) or "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join(lines)


def _f4(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _signed(value) -> str:
    return f"{value:+.4f}" if isinstance(value, (int, float)) else "?"


def _num(value) -> str:
    return "-" if value is None else str(value)


def _when(ts) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

