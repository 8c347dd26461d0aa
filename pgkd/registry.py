"""The model registry: stored versions on disk, which one serves in Redis.

A version is a directory of the model store (``models/v0003/``, layout in
``models/README.md``): what :meth:`Student.save` writes, the prebuilt ONNX
Runtime graphs a publisher was asked for (``onnx/``), and ``manifest.json`` with
the sha256 of every file. It is written under ``.tmp-<uuid>/`` and renamed
into place only when complete, so a reader never sees half a version, and a
crash leaves only a ``.tmp-*`` directory that is never listed.

Redis holds what must change atomically and be shared by every worker:

``{ns}:registry:current``      the version that serves (a string)
``{ns}:registry:history``      every promote / rollback, oldest first (JSON list)
``{ns}:registry:stack``        the promoted versions, for rollback
``{ns}:registry:version_seq``  INCR: version numbers unique across trainers
``{ns}:registry:rounds``       every retrain round record, oldest first (JSON list)
``{ns}:registry:round_seq``    INCR: round numbers
``{ns}:registry:claim:<id>``   SET NX: one trainer runs a retrain request
``{ns}:registry:hashed:<v>``   the version's files as last hashed and found
                               matching (sha256 and stat), for promote/rollback

Nothing here is loaded or promoted without first checking every file against
its checksum (:class:`ModelIntegrityError` names the file). A load hashes what
it reads, every time. A promotion or rollback hashes a file again only when
its stat (device, inode, size, mtime, ctime) differs from when it was last
hashed and matched, at publish or at an earlier check (:func:`stamp`): moving
the pointer then costs stat calls, not ~155 MB of sha256 on the cores that
serve. Only files inside the version directory are ever read: a name in the
manifest is hashed only when it is one of the directory's own regular files,
and a symbolic link or a pickle file in the directory refuses the whole
version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Collection, Iterator, MutableMapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis

from pgkd.errors import ModelIntegrityError, RegistryError, RegistryUnavailable, first_line
from pgkd.passes import LABELS_FILE, PICKLE_SUFFIXES

if TYPE_CHECKING:
    from pgkd.settings import Settings
    from pgkd.student import Student

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
VERSION_RE = re.compile(r"^v(\d{4,})\Z")  # \Z: "$" would also match before a final newline
OUTCOMES = ("promoted", "rejected", "failed")
STACK_DEPTH = 1000  # how many promotions back a rollback can go
_CHUNK = 1 << 20
# A stamp is recorded only when the file's last change is this much older than the stat
# that took it ("racy" otherwise: a write in the same tick of the file system's clock
# after the stat would leave the same stamp). Most Linux file systems stamp to the
# jiffy (<= 10 ms); ones that stamp to the second (ext3, FAT, some NFS) get 2 s.
RACY_S = 0.05
RACY_WHOLE_SECONDS_S = 2.0
HASHED_TTL_S = 30 * 24 * 3600  # {ns}:registry:hashed:<v> expires unused after 30 days (a full hash then)
GRAPH_DIR = "onnx"  # a version's prebuilt ONNX Runtime graphs (graph_file)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")  # the torch weights (one file or shards + index)


def redact_url(url: str) -> str:
    """The URL with its password, and query values that look like credentials,
    replaced by ``***`` (safe to log or print).

    >>> redact_url("redis://:s3cret@cache.internal:6380/2")
    'redis://:***@cache.internal:6380/2'
    >>> redact_url("rediss://app:s3cret@cache/0?password=s3cret")
    'rediss://app:***@cache/0?password=***'
    >>> redact_url("https://llm.internal/v1?api-key=s3cret&region=eu")
    'https://llm.internal/v1?api-key=***&region=eu'
    >>> redact_url("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = _CREDENTIAL_PARAM.sub(r"\1=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# query parameters whose values are credentials (password=, api-key=, api_key=, token=, sig=, secret=, ...)
_CREDENTIAL_PARAM = re.compile(r"((?:^|&)[^=&]*(?:password|passwd|key|token|secret|sig)[^=&]*)=[^&]*", re.IGNORECASE)


def graph_file(quantize: str) -> str:
    """Where a version directory keeps its prebuilt graph for ``quantize``.

    >>> graph_file("int8")
    'onnx/model.int8.onnx'
    """
    if quantize not in ("fp32", "int8"):
        raise ValueError(f"quantize must be fp32 or int8, got {quantize!r}")
    return f"{GRAPH_DIR}/model.{quantize}.onnx"


def stored_graph(manifest: dict, quantize: str) -> dict | None:
    """The entry of a version's prebuilt ``quantize`` ONNX graph (``manifest["graphs"]``),
    or None when it has none: one whose file is not where :func:`graph_file` puts it,
    or is not checksummed by the manifest, does not count.

    >>> m = {"files": {"onnx/model.int8.onnx": "ab12"},
    ...      "graphs": {"int8": {"file": "onnx/model.int8.onnx", "inputs": ["input_ids"]}}}
    >>> stored_graph(m, "int8")["inputs"], stored_graph(m, "fp32")
    (['input_ids'], None)
    """
    entry = (manifest.get("graphs") or {}).get(quantize) if isinstance(manifest.get("graphs"), dict) else None
    if (not isinstance(entry, dict) or entry.get("file") != graph_file(quantize)
            or entry["file"] not in manifest.get("files", {}) or not isinstance(entry.get("inputs"), list)):
        return None
    return entry


def stored_graphs(manifest: dict) -> list[str]:
    """The quantize modes of the ONNX Runtime graphs a version stores (:func:`stored_graph`).

    >>> stored_graphs({"files": {"onnx/model.int8.onnx": "ab12"},
    ...                "graphs": {"int8": {"file": "onnx/model.int8.onnx", "inputs": ["input_ids"]}}})
    ['int8']
    """
    return [quantize for quantize in ("fp32", "int8") if stored_graph(manifest, quantize)]


def weights_or_graph(name: str) -> bool:
    """Whether a version's file ``name`` holds the model's weights: the torch
    weights or one of the prebuilt ONNX graphs (the rest: tokenizer, labels, config).

    >>> [weights_or_graph(n) for n in ("model.safetensors", "onnx/model.int8.onnx", "tokenizer.json")]
    [True, True, False]
    """
    return name.endswith(WEIGHT_SUFFIXES) or name.startswith(f"{GRAPH_DIR}/")


def unread_by_graph(manifest: dict, quantize: str) -> frozenset[str]:
    """The files of a version that a worker serving its stored ``quantize`` graph
    never opens: the torch weights and the other graphs. Such a worker need not
    hash them (:meth:`Registry.verify`'s ``unread``); whoever opens them verifies
    them (a promotion, the trainer, a torch worker, a graph build).

    >>> m = {"files": {"model.safetensors": "a", "tokenizer.json": "b", "labels.json": "c",
    ...                "onnx/model.int8.onnx": "d", "onnx/model.fp32.onnx": "e"}}
    >>> sorted(unread_by_graph(m, "int8"))
    ['model.safetensors', 'onnx/model.fp32.onnx']
    """
    served = graph_file(quantize)
    return frozenset(name for name in manifest["files"] if weights_or_graph(name) and name != served)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stamp(path: Path) -> str | None:
    """The file's stat as a string (device, inode, size, mtime and ctime in ns),
    taken *before* it is hashed; None when its last change is too recent to
    trust (:data:`RACY_S`). Any write to the file after this call changes its
    ctime (user space cannot set it), so an unchanged stamp means unchanged
    contents. None where the stat fails (the hash then fails too)."""
    now = time.time_ns()
    try:
        st = path.stat()
    except OSError:
        return None
    if racy(st.st_mtime_ns, st.st_ctime_ns, now):
        return None
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def racy(mtime_ns: int, ctime_ns: int, now_ns: int) -> bool:
    """Whether a file last changed at these times may change again without its
    stat showing it (:data:`RACY_S`; :data:`RACY_WHOLE_SECONDS_S` where the
    file system stamps whole seconds).

    >>> racy(10_020_000_000, 10_020_000_000, 10_050_000_000)  # 30 ms before the stat
    True
    >>> racy(10_020_000_000, 10_020_000_000, 10_080_000_000)  # 60 ms before
    False
    >>> racy(10_000_000_000, 10_000_000_000, 11_000_000_000)  # whole seconds: 1 s is not enough
    True
    """
    whole_seconds = mtime_ns % 1_000_000_000 == 0 and ctime_ns % 1_000_000_000 == 0
    margin_ns = int(1e9 * (RACY_WHOLE_SECONDS_S if whole_seconds else RACY_S))
    return max(mtime_ns, ctime_ns) > now_ns - margin_ns


def hash_and_stamp(path: Path) -> tuple[str, str | None]:
    """``(sha256, stamp)`` of a file, the stamp taken before the hash (:func:`stamp`)."""
    before = stamp(path)
    return sha256_file(path), before


def version_number(version: str) -> int:
    """``"v0012"`` -> 12; RegistryError for anything that is not a version name.

    >>> version_number("v0012")
    12
    """
    match = VERSION_RE.match(version)
    if not match:
        raise RegistryError(f"not a version name: {version!r} (expected v0001-style)")
    return int(match.group(1))


class Registry:
    """Versions in ``store``; pointer, history and rounds in Redis under ``namespace``."""

    def __init__(self, store: str | Path, redis_url: str, namespace: str = "pgkd", *, timeout_s: float = 5.0):
        self.store = Path(store)
        self.namespace = namespace
        self.redis_url = redact_url(redis_url)  # the password never leaves the client
        try:
            self._redis = redis.Redis.from_url(
                redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
            )
        except ValueError as err:
            raise RegistryError(f"not a Redis URL: {self.redis_url} ({first_line(err)})") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The deployment's registry: ``PGKD_MODEL_STORE``, ``PGKD_REDIS_URL``, keys
        under ``PGKD_APP_ID_PREFIX``."""
        return cls(
            settings.model_store,
            settings.redis_url.get_secret_value(),
            namespace=settings.app_id_prefix,
            timeout_s=settings.redis_timeout_s,
        )

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry(store={str(self.store)!r}, redis={self.redis_url!r}, namespace={self.namespace!r})"

    def _key(self, name: str) -> str:
        return f"{self.namespace}:registry:{name}"

    @contextlib.contextmanager
    def _redis_errors(self) -> Iterator[None]:
        """Redis failures as one-line registry errors that name the URL, never the password."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise RegistryUnavailable(f"cannot reach the registry's Redis at {self.redis_url}: {first_line(err)}") from None
        except redis.RedisError as err:
            raise RegistryError(f"the registry's Redis at {self.redis_url} failed: {first_line(err)}") from None

    # --- the store ----------------------------------------------------------------

    def path(self, version: str) -> Path:
        """The directory of a stored version; RegistryError when there is none."""
        version_number(version)  # a name, not a path: "../x" never reaches the file system
        path = self.store / version
        if not path.is_dir():
            raise RegistryError(f"no version {version} in the model store {self.store}")
        return path

    def versions(self) -> list[str]:
        """Stored versions, oldest first (``.tmp-*`` directories of unfinished publishes are not versions)."""
        if not self.store.is_dir():
            return []
        names = [p.name for p in self.store.iterdir() if VERSION_RE.match(p.name) and p.is_dir()]
        return sorted(names, key=version_number)

    def publish(
        self,
        student: Student,
        *,
        parent: str | None,
        round: int,
        data: dict,
        metrics: dict,
        settings: dict,
        drift_reference: dict | None = None,
        graphs: Sequence[str] = (),
    ) -> str:
        """Store ``student`` as a new version and return its name. It does not serve
        until :meth:`promote`. ``drift_reference`` (``pgkd.drift``: the version's
        validation predictions) is the baseline the classifiers' drift monitor uses.
        ``graphs`` (``"int8"``/``"fp32"``): the ONNX Runtime graphs to build from the
        stored weights and keep with them (checked, checksummed, listed under the
        manifest's ``graphs``), so that workers serving them load a session instead
        of building one; one that cannot be built is left out (logged)."""
        return self._publish(student.save, parent=parent, round=round, data=data, metrics=metrics, settings=settings,
                             drift_reference=drift_reference, graphs=graphs)

    def _publish(
        self, write: Callable[[Path], None], *, parent, round, data, metrics, settings, drift_reference=None,
        graphs: Sequence[str] = (),
    ) -> str:
        if parent is not None:
            version_number(parent)
        if not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        self.store.mkdir(parents=True, exist_ok=True)
        tmp = self.store / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            write(tmp)
            built = _add_graphs(tmp, graphs)
            hashes = {name: hash_and_stamp(tmp / name) for name in _files(tmp) if name != MANIFEST_FILE}
            files = {name: sha for name, (sha, _) in hashes.items()}
            for name in files:
                _fsync_file(tmp / name)
            while True:
                version = f"v{self._incr('version_seq'):04d}"
                manifest = {
                    "version": version,
                    "parent": parent,
                    "round": round,
                    "data": data,
                    "metrics": metrics,
                    "settings": settings,
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                    "files": files,
                }
                if drift_reference is not None:
                    manifest["drift_reference"] = drift_reference
                if built:
                    manifest["graphs"] = built
                _write_durably(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2, default=_json_default) + "\n")
                _fsync_dir(tmp)
                if _rename_new(tmp, self.store / version):
                    break
                # Another registry (a different namespace on a shared store, or a flushed
                # Redis) already wrote this name: take the next number.
                log.warning("model store %s already has %s; taking the next version number", self.store, version)
            _fsync_dir(self.store)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # renaming the directory leaves its files' stat as it was: their stamps hold in the version
        try:
            self._remember_hashed(version, {name: f"{sha} {at}" for name, (sha, at) in hashes.items() if at})
        except RegistryError as err:  # published all the same; its first promotion hashes every file
            log.warning("published %s without a record of its hashed files: %s", version, err)
        log.info("published %s (parent %s, round %d) in %s", version, parent, round, self.store)
        return version

    def import_dir(self, src: str | Path, *, parent: str | None = None, round: int = 0,
                   graphs: Sequence[str] = ()) -> str:
        """Publish a directory written by ``pgkd train``/``pgkd distill``/``Student.save``
        (e.g. ``runs/x/model``) as a new version: how a deployment gets its first one.
        Metrics, data counts and settings come from a ``report.json`` beside it, if any;
        ``graphs`` as in :meth:`publish`."""
        from pgkd.student import Student  # torch only when a model is really read

        src = Path(src)
        student = Student.load(src, device="cpu")  # refuses anything that is not a safetensors student
        data, metrics, settings = _report_beside(src)
        return self.publish(student, parent=parent, round=round, data=data, metrics=metrics, settings=settings,
                            graphs=graphs)

    def manifest(self, version: str) -> dict:
        """The version's manifest.json (read, not verified)."""
        return read_manifest(self.path(version), version)

    def verify(self, version: str, *, unread: Collection[str] = frozenset()) -> dict:
        """The manifest, once every file matches its sha256 and no file is missing
        or extra; otherwise ModelIntegrityError naming the first bad file
        (:func:`verify_dir`; ``unread`` as there)."""
        return verify_dir(self.path(version), version, unread=unread)

    def verify_unchanged(self, version: str) -> dict:
        """:meth:`verify` for a move of the pointer (promote, rollback), which
        reads no file: a file is hashed again only when its stat changed since
        it was last hashed and matched (``{ns}:registry:hashed:<version>``,
        :func:`verify_dir`'s ``hashed``). Every worker still hashes the files it
        loads."""
        path = self.path(version)
        try:
            with self._redis_errors():
                hashed = self._redis.hgetall(self._key(f"hashed:{version}"))
        except RegistryUnavailable:
            raise  # the pointer cannot move either: say so now, before hashing ~155 MB
        except RegistryError as err:  # e.g. WRONGTYPE: a record is an optimisation, never a refusal
            log.warning("%s: no record of %s's hashed files (%s); hashing every file", self.redis_url, version, err)
            hashed = {}
        before = dict(hashed)
        manifest = verify_dir(path, version, hashed=hashed)
        try:
            self._remember_hashed(version, {k: v for k, v in hashed.items() if before.get(k) != v})
        except RegistryError as err:  # verified all the same
            log.warning("could not record %s's hashed files: %s", version, err)
        return manifest

    def _remember_hashed(self, version: str, entries: dict[str, str]) -> None:
        """Record files hashed and found matching (name -> "<sha256> <stamp>")."""
        if not entries:
            return
        key = self._key(f"hashed:{version}")
        with self._redis_errors():
            self._redis.pipeline().hset(key, mapping=entries).expire(key, HASHED_TTL_S).execute()

    def load(self, version: str, device=None) -> Student:
        """The verified version as a :class:`Student` (checksums first, then weights)."""
        from pgkd.student import Student

        self.verify(version)
        return Student.load(self.path(version), device=device)

    def labels(self, version: str) -> list[str]:
        """The version's label set, from its checksum-verified labels.json, without reading the weights."""
        return verified_labels(self.path(version), version)

    # --- the pointer --------------------------------------------------------------

    def current(self) -> str | None:
        """The version that serves, or None before the first promotion."""
        with self._redis_errors():
            return self._redis.get(self._key("current"))

    def promote(self, version: str, *, reason: str, round: int | None = None) -> dict:
        """Make ``version`` current, after verifying it; returns the history entry.

        The pointer, the rollback stack and the history change in one MULTI/EXEC
        (retried if another promotion races this one)."""
        self.verify_unchanged(version)  # a tampered or partial version never becomes current

        def change(pipe: redis.client.Pipeline) -> dict:
            previous = pipe.get(self._key("current"))
            if previous == version:
                raise RegistryError(f"{version} is already the current version")
            entry = _entry("promote", version, previous, reason, round)
            pipe.multi()
            pipe.set(self._key("current"), version)
            pipe.rpush(self._key("stack"), version)
            pipe.ltrim(self._key("stack"), -STACK_DEPTH, -1)
            pipe.rpush(self._key("history"), json.dumps(entry))
            return entry

        with self._redis_errors():
            entry = self._redis.transaction(
                change, self._key("current"), self._key("stack"), value_from_callable=True
            )
        log.info("promoted %s (was %s): %s", version, entry["previous"], reason)
        return entry

    def rollback(self, *, reason: str = "operator rollback") -> dict:
        """Make current again the version that was current before the current one
        (repeated rollbacks walk further back); returns the history entry."""
        verified: set[str] = set()

        def change(pipe: redis.client.Pipeline) -> dict:
            current = pipe.get(self._key("current"))
            stack = pipe.lrange(self._key("stack"), 0, -1)
            while stack and stack[-1] == current:
                stack.pop()
            if not stack:
                if current is None:
                    raise RegistryError("nothing to roll back to: no version has been promoted")
                raise RegistryError(f"nothing to roll back to: {current} is the first promoted version")
            target = stack[-1]
            if target not in verified:  # WATCH retries re-run this; verify each version once
                self.verify_unchanged(target)
                verified.add(target)
            entry = _entry("rollback", target, current, reason, None)
            pipe.multi()
            pipe.delete(self._key("stack"))
            pipe.rpush(self._key("stack"), *stack)
            pipe.set(self._key("current"), target)
            pipe.rpush(self._key("history"), json.dumps(entry))
            return entry

        with self._redis_errors():
            entry = self._redis.transaction(
                change, self._key("current"), self._key("stack"), value_from_callable=True
            )
        log.info("rolled back to %s (was %s): %s", entry["version"], entry["previous"], reason)
        return entry

    def history(self, limit: int = 50) -> list[dict]:
        """The last ``limit`` promote/rollback entries, oldest first."""
        return self._tail("history", limit)

    # --- retrain rounds -----------------------------------------------------------

    def next_round(self) -> int:
        """A new round number (1, 2, ...), unique across trainers."""
        return self._incr("round_seq")

    def claim_round(self, request_id: str, ttl_s: int) -> bool:
        """True for the one caller that may run this retrain request; the claim
        expires after ``ttl_s`` so a request whose trainer died can run again."""
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "ts": time.time()})
        with self._redis_errors():
            return bool(self._redis.set(self._key(f"claim:{request_id}"), value, nx=True, ex=int(ttl_s)))

    def release_round(self, request_id: str) -> None:
        """Drop a claim early (a failed round that should be retried at once)."""
        with self._redis_errors():
            self._redis.delete(self._key(f"claim:{request_id}"))

    def record_round(self, record: dict) -> bool:
        """Append one round's record (passed, rejected or failed); ``ts`` is added when absent.

        At most once per ``request_id``: the record and the request id's entry in
        ``{ns}:rounds:by_request`` are written in one Lua call, so a trainer
        killed between recording a round and noting it in its ledger cannot
        record (or run) that round a second time. Returns False, writing
        nothing, when the request's round is already recorded."""
        if not isinstance(record.get("round"), int):
            raise ValueError(f"a round record needs an int 'round', got {record.get('round')!r}")
        if record.get("outcome") not in OUTCOMES:
            raise ValueError(f"a round record's outcome must be one of {OUTCOMES}, got {record.get('outcome')!r}")
        record = {**record, "ts": record.get("ts", time.time())}
        blob = json.dumps(record, default=_json_default)
        with self._redis_errors():
            if record.get("request_id") is None:
                self._redis.rpush(self._key("rounds"), blob)
                return True
            keys = [self._key("rounds:by_request"), self._key("rounds")]
            return bool(self._redis.eval(_RECORD_ONCE, 2, *keys, str(record["request_id"]), blob))

    def recorded_round(self, request_id: str) -> dict | None:
        """The round record of a retrain request, when one was recorded."""
        with self._redis_errors():
            raw = self._redis.hget(self._key("rounds:by_request"), request_id)
        return json.loads(raw) if raw else None

    def rounds(self, limit: int = 50) -> list[dict]:
        """The last ``limit`` round records, oldest first."""
        return self._tail("rounds", limit)

    # --- Redis helpers ------------------------------------------------------------

    def _incr(self, name: str) -> int:
        with self._redis_errors():
            return int(self._redis.incr(self._key(name)))

    def _tail(self, name: str, limit: int) -> list[dict]:
        if limit <= 0:
            return []
        with self._redis_errors():
            raw = self._redis.lrange(self._key(name), -limit, -1)
        return [json.loads(item) for item in raw]


# KEYS[1] = request id -> record (hash), KEYS[2] = the rounds list; ARGV = request id, record
_RECORD_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def _entry(action: str, version: str, previous: str | None, reason: str, round: int | None) -> dict:
    return {"action": action, "version": version, "previous": previous, "reason": reason, "round": round,
            "ts": time.time()}


def _add_graphs(model_dir: Path, graphs: Sequence[str]) -> dict:
    """Build the ONNX graphs ``graphs`` asks for into the unpublished ``model_dir``:
    their manifest entries by quantize mode (those that could not be built are left
    out, with a warning: workers serving them build their own, as before)."""
    if not graphs:
        return {}
    from pgkd.inference_onnx import OnnxError, add_graph  # torch only when a graph is asked for

    built = {}
    for quantize in dict.fromkeys(graphs):
        try:
            built[quantize] = add_graph(model_dir, quantize)
        except OnnxError as err:
            log.warning("publishing without the %s ONNX graph (%s); workers serving it will build their own",
                        quantize, err)
    return built


def read_manifest(directory: Path, version: str | None) -> dict:
    """The manifest.json of the version directory ``directory`` (read, not verified),
    which must name ``version``: a registry version. None: whichever version it
    names (a copy of one, served as ``PGKD_SERVE_MODEL``, under any name).
    ModelIntegrityError, naming the version (else the directory), when it is
    missing, unreadable or names another version."""
    shown = version or _shown(directory.name)  # who the errors name
    path = directory / MANIFEST_FILE
    if path.is_symlink():
        raise ModelIntegrityError(f"{shown} refused: {MANIFEST_FILE} is a symbolic link in {path.parent}")
    if not path.is_file():
        raise ModelIntegrityError(f"{shown} refused: {MANIFEST_FILE} is missing in {path.parent}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError('no "files" object')
    except (OSError, ValueError) as err:
        raise ModelIntegrityError(
            f"{shown} refused: {MANIFEST_FILE} is unreadable ({first_line(err)}) in {path.parent}"
        ) from None
    except RecursionError:  # a nesting bomb
        raise ModelIntegrityError(
            f"{shown} refused: {MANIFEST_FILE} is unreadable (nested too deeply) in {path.parent}"
        ) from None
    named = manifest.get("version")
    if (named != version) if version else not isinstance(named, str):
        raise ModelIntegrityError(
            f"{shown} refused: {MANIFEST_FILE} names version {named!r:.60} in {path.parent}"
        )
    return manifest


def verified_labels(directory: Path, version: str | None) -> list[str]:
    """The label set of the version directory ``directory`` (``version`` as in
    :func:`read_manifest`), from its labels.json once it matches the manifest's
    sha256, without reading the weights. ModelIntegrityError otherwise."""
    manifest = read_manifest(directory, version)
    shown = version or _shown(manifest["version"])
    path = directory / LABELS_FILE
    expected = manifest["files"].get(LABELS_FILE)
    if path.is_symlink():
        raise ModelIntegrityError(f"{shown} refused: {LABELS_FILE} is a symbolic link in {directory}")
    if expected is None or not path.is_file():
        raise ModelIntegrityError(f"{shown} refused: {LABELS_FILE} is missing in {directory}")
    if sha256_file(path) != expected:
        raise ModelIntegrityError(f"{shown} refused: {LABELS_FILE} does not match its sha256 in {directory}")
    return list(json.loads(path.read_text(encoding="utf-8"))["labels"])


def verify_dir(directory: Path, version: str | None, *, unread: Collection[str] = frozenset(),
               hashed: MutableMapping[str, str] | None = None) -> dict:
    """The manifest of the version directory ``directory`` (:func:`read_manifest`),
    once every file matches its sha256 and no file is missing or extra; otherwise
    ModelIntegrityError naming the first bad file.

    ``unread``: files the caller will not open (:func:`unread_by_graph`). They
    must still be present and listed, and be neither links nor pickles, but
    are not hashed: a worker serving a stored graph then reads ~64 MB at a
    swap instead of ~155 (MiniLM int8).

    ``hashed``: files hashed before, name -> ``"<sha256> <stamp>"``
    (:func:`stamp`). A file whose entry has the manifest's sha256 and the
    file's current stamp is not hashed again; a file hashed now that matches
    is entered (when its stamp can be trusted). Only for callers that do not
    read the files (promote, rollback): a reader hashes what it reads."""
    path = directory
    manifest = read_manifest(path, version)
    shown = version or _shown(manifest["version"])  # a copy: the version its manifest names
    listed: dict[str, str] = manifest["files"]
    links = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_symlink())
    if links:  # a link would make us hash (and later load) a file outside the version
        raise ModelIntegrityError(f"{shown} refused: {_shown(links[0])} is a symbolic link in {path}")
    present = set(_files(path)) - {MANIFEST_FILE}
    pickles = sorted(name for name in present | listed.keys() if name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelIntegrityError(
            f"{shown} refused: {_shown(pickles[0])} is a pickle file (only safetensors are loaded) in {path}"
        )
    # A listed name is hashed only if it is one of the directory's own files:
    # "../x" or "/etc/passwd" is never one, so it is "missing", never read.
    missing = sorted(listed.keys() - present)
    if missing:
        raise ModelIntegrityError(
            f"{shown} refused: {_shown(missing[0])} is missing (listed in {MANIFEST_FILE}) in {path}"
        )
    extra = sorted(present - listed.keys())
    if extra:
        raise ModelIntegrityError(
            f"{shown} refused: {_shown(extra[0])} is not listed in {MANIFEST_FILE} (extra file) in {path}"
        )
    for name, expected in sorted(listed.items()):
        if name in unread:
            continue
        now = stamp(path / name) if hashed is not None else None
        if now is not None and hashed.get(name) == f"{expected} {now}":
            continue  # unchanged since it was hashed and matched
        found = sha256_file(path / name)
        if found != expected:
            raise ModelIntegrityError(
                f"{shown} refused: {_shown(name)} does not match its sha256 "
                f"(manifest {_shown(str(expected)[:12])}..., file {found[:12]}...) in {path}"
            )
        if now is not None:
            hashed[name] = f"{expected} {now}"
    return manifest


def _files(root: Path) -> list[str]:
    """Every file under ``root`` as a relative POSIX path, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _report_beside(model_dir: Path) -> tuple[dict, dict, dict]:
    """(data, metrics, settings) from the ``report.json`` that ``pgkd train`` /
    ``pgkd distill`` write next to ``model/``; empty dicts where there is none."""
    settings: dict[str, Any] = {"imported_from": str(model_dir.resolve())}
    path = model_dir.parent / "report.json"
    if not path.is_file():
        return {}, {}, settings
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("ignoring %s: %s", path, err)
        return {}, {}, settings
    settings["report"] = str(path.resolve())
    if isinstance(report.get("final"), dict):  # pgkd distill: headline numbers, data sizes, config
        metrics = dict(report["final"].get("val") or {})
        return dict(report.get("data") or {}), metrics, {**(report.get("config") or {}), **settings}
    val = report.get("val") if isinstance(report.get("val"), dict) else {}  # pgkd train: the full report
    data = {"train": (report.get("train") or {}).get("n"), "val": val.get("n")}
    return {k: v for k, v in data.items() if v is not None}, dict(val), settings


def _rename_new(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (False then). rename(2) is
    atomic within one file system; it would replace an *empty* directory, hence
    the check first."""
    if dst.exists():
        return False
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data files are already synced
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. a TrainConfig
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if type(obj).__name__ == "device":  # torch.device
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _shown(name: str, width: int = 80) -> str:
    """A file name as an error message shows it: as is when plain, else quoted
    with escapes, so a name holding a newline cannot split the message.

    >>> _shown("model.safetensors")
    'model.safetensors'
    >>> print(_shown("a\\nb"))
    'a\\nb'
    """
    return name if name.isprintable() and len(name) <= width else repr(name[:width])

