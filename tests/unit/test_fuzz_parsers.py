"""Every parser that reads bytes from outside, fuzzed: no input raises anything
but the parser's named error, and every refusal is one short line.

The parsers: ``texts.in`` values (:func:`pgkd.inference.parse_input`), the
workers' own topics (``TeacherRequest`` / ``TeacherLabel`` / ``RetrainRequest``
``.parse``), teacher answers (:func:`pgkd.prompts.parse_labels` /
:func:`~pgkd.prompts.parse_samples`), cached teacher answers
(:class:`pgkd.teacher_cache.TeacherCache`) and model manifests
(:meth:`pgkd.registry.Registry.verify`). ``model.updates`` records are fuzzed in
test_model_watcher.py, next to the watcher that reads them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgkd import registry as registry_module
from pgkd.errors import ModelIntegrityError, RegistryError
from pgkd.inference import MAX_JSON_DEPTH, REJECT_REASONS, Rejected, TextIn, load_json, parse_input
from pgkd.prompts import REJECT_REASONS as SAMPLE_REJECT_REASONS
from pgkd.prompts import ResponseFormatError, echoes_prompt, normalize_text, parse_labels, parse_samples
from pgkd.registry import Registry, version_number
from pgkd.teacher_cache import CachedLabel, TeacherCache
from streams.schemas import DeadLetter, LabelOut, RetrainRequest, TeacherLabel, TeacherRequest

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TAXONOMY = ["card_arrival", "card_lost", "refund"]

# --- building hostile JSON --------------------------------------------------------

LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats()  # floats include nan and +-inf
    | st.text(max_size=12) | st.sampled_from(LONE_SURROGATES)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
# JSON tokens json.dumps never writes, spliced in as text
RAW_TOKENS = [
    "NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1" * 5000, "1" * 4000, "-0", "0.0", "1E+2",
    str(2**64 - 1), str(2**64), str(-(2**63)), str(-(2**63) - 1),
    '"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"', '"\\u0000"', '"line\\nbreak"', "true", "null", '""', '"ok"',
    "[" * 64 + "]" * 64, "[" * 65 + "]" * 65, "[" * 999 + "]" * 999, "[" * 100_000, "{" * 50_000,
]
NESTING = [1, 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 200, 999, 5_000, 100_000]


def render(value, ascii_only: bool) -> bytes:
    """JSON text of ``value`` (NaN/Infinity written as tokens); with ``ascii_only``
    off, lone surrogates are written raw, which is not UTF-8."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def texts_in_values(draw) -> bytes:
    kind = draw(st.sampled_from(["binary", "value", "object", "template", "nested"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "value":
        return render(draw(values), draw(st.booleans()))
    if kind == "object":
        obj = draw(st.dictionaries(st.text(max_size=6), values, max_size=3))
        for name in ("id", "text"):
            if draw(st.integers(0, 9)):  # mostly present, of any type, mostly a string
                obj[name] = draw(st.text(max_size=30) if draw(st.integers(0, 3)) else values)
        return render(obj, draw(st.booleans()))
    if kind == "template":
        token = [draw(st.sampled_from(RAW_TOKENS)) for _ in range(3)]
        return f'{{"id": {token[0]}, "text": {token[1]}, "x": {token[2]}}}'.encode()
    depth = draw(st.sampled_from(NESTING))
    where = draw(st.sampled_from(["top", "extra"]))
    nest = "[" * depth + "]" * depth
    return (nest if where == "top" else f'{{"id": "a", "text": "b", "x": {nest}}}').encode()


def at_stack_depth(frames: int, fn):
    """``fn()`` called ``frames`` Python frames deeper: where a worker encodes its records."""
    return fn() if frames == 0 else at_stack_depth(frames - 1, fn)


def strict_json(data: bytes):
    def refuse(token):
        raise ValueError(f"{token} in an output")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


def one_line(text: str, limit: int) -> bool:
    return isinstance(text, str) and len(text.splitlines()) <= 1 and len(text) <= limit


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- texts.in -----------------------------------------------------------------------


@FUZZ
@given(raw=texts_in_values(), max_text=st.integers(1, 40), max_id=st.integers(1, 20))
def test_parse_input_never_raises_and_every_result_can_be_written(raw, max_text, max_id):
    result = parse_input(raw, max_text, max_id)
    assert type(result) in (TextIn, Rejected)
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS
        assert one_line(result.detail, 200), result.detail
        assert result.id is None or (0 < len(result.id) <= max_id and utf8(result.id))
        # the dead letter the classifier sends: valid JSON, its key a valid Kafka key
        letter = DeadLetter.of(stage="parse", reason=result.reason, error=result.detail, topic="texts.in",
                               partition=0, offset=7, value=raw, ts=1.0, max_original_bytes=64, id=result.id)
        sent = strict_json(letter.dumps())
        assert (sent["reason"], sent["id"], sent["original_size"]) == (result.reason, result.id, len(raw))
        letter.key().encode("utf-8")
        return
    assert result.text.strip() and len(result.text) <= max_text and utf8(result.text)
    assert 0 < len(result.id) <= max_id and utf8(result.id)
    # extra is carried into labels.out: strict JSON, even encoded deep in a worker's stack
    out = LabelOut(id=result.id, label="x", confidence=0.5, top_k=[["x", 0.5]], model_version="v0001",
                   source="student", needs_review=False, ts=1.0, extra=result.extra)
    encoded = at_stack_depth(300, out.dumps)  # bytes; strict_json reads them as UTF-8
    assert strict_json(encoded)["extra"] == json.loads(json.dumps(result.extra, allow_nan=False))


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        (b'{"id": "a", "text": "b", "n": 1e999}', "malformed_json", "value is not JSON: number 1e999 is out of range"),
        (b'{"id": "a", "text": "b", "n": -1e400}', "malformed_json", "value is not JSON: number -1e400 is out of range"),
        (b'{"id": "a", "text": "b", "x": ' + b"[" * 65 + b"]" * 65 + b"}", "malformed_json",
         "value is not JSON: nested deeper than 64 levels"),
        (b"[" * 100_000, "malformed_json", "value is not JSON: nested deeper than 64 levels"),
        # faust encodes labels.out with orjson: "TypeError: Integer exceeds 64-bit range" in the worker
        (b'{"id": "a", "text": "b", "n": 18446744073709551616}', "malformed_json",
         "value is not JSON: number 18446744073709551616 is out of range"),
        # the id is unusable as a key: the record is refused before any field is read
        (b'{"id": "\\ud800", "text": 5}', "not_utf8", "the JSON holds a lone surrogate escape (\\ud800-\\udfff)"),
    ],
    ids=["overflowing-float", "overflowing-negative", "nested-65-in-extra", "nesting-bomb", "int-over-64-bits",
         "surrogate-id"],
)
def test_inputs_that_would_break_an_output_are_refused(raw, reason, detail):
    """Found by the fuzz test: the numbers and the 65 levels were accepted (their labels.out
    record could not be written), the surrogate id was carried as the dead letter's key."""
    assert isinstance(parse_input(b'{"id": "a", "text": "b", "n": 18446744073709551615}', 100), TextIn)
    result = parse_input(raw, 100)
    assert result == Rejected(reason, detail)


def test_nesting_up_to_the_limit_is_accepted():
    nest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    result = parse_input(f'{{"id": "a", "text": "b", "x": {nest[1:-1]}}}'.encode(), 100)
    assert isinstance(result, TextIn)  # the object and 63 arrays: 64 levels
    assert load_json(nest) == json.loads(nest)


# --- the workers' own topics ---------------------------------------------------------

VALID = {
    TeacherRequest: {"id": "a1", "text": "where is my card", "student_label": "card_arrival",
                     "student_confidence": 0.2, "top_k": [["card_arrival", 0.2]], "model_version": "v0001",
                     "ts": 1.0, "extra": {"lang": "en"}},
    TeacherLabel: {"id": "a1", "text": "where is my card", "label": "card_arrival", "teacher_model": "m",
                   "usage": {"cost_usd": 0.001}, "student_label": "card_lost", "student_confidence": 0.2,
                   "model_version": "v0001", "ts": 1.0, "labelled_at": 2.0},
    RetrainRequest: {"request_id": "r1", "round": 3, "samples_upto": "5-0", "since": "0-0", "trigger": "size",
                     "counts": {"teacher": 4}, "target_classes": ["refund"], "generation": {}, "model_version": None,
                     "ts": 1.0},
}
# What each declared field must hold (the spec, written out; not read from the code)
KINDS = {
    "str": lambda v: isinstance(v, str),
    "Optional[str]": lambda v: v is None or isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and finite(v),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


def finite(number) -> bool:
    try:
        return math.isfinite(float(number))
    except OverflowError:  # an int no float can hold: a worker's ts arithmetic would raise
        return False


def filled(cls, record) -> bool:
    """The fields each parser also needs non-empty."""
    get = record.get if isinstance(record, dict) else lambda name: getattr(record, name)
    if cls is TeacherRequest:
        return bool(get("text").strip())
    if cls is TeacherLabel:
        return all(get(name) for name in ("id", "text", "label"))
    return bool(get("request_id"))


def well_formed(cls, obj: dict) -> bool:
    return all(name in obj and KINDS[kind](obj[name]) for name, kind in cls.__annotations__.items()) and filled(
        cls, obj)


def json_safe(value) -> bool:
    """Strict JSON, not too deep, and UTF-8 all through (no lone surrogate)."""
    try:
        load_json(json.dumps(value))
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return True


@st.composite
def record_values(draw, cls) -> tuple[bytes, dict | None]:
    """(raw value, the object it encodes when it is a JSON object we build)."""
    kind = draw(st.sampled_from(["binary", "value", "mutated", "dropped", "template"]))
    if kind == "binary":
        return draw(st.binary(max_size=200)), None
    if kind == "value":
        return render(draw(values), True), None
    if kind == "template":
        token = draw(st.sampled_from(RAW_TOKENS))
        name = draw(st.sampled_from(sorted(VALID[cls])))
        body = json.dumps({k: v for k, v in VALID[cls].items() if k != name})[:-1]
        return f'{body}, "{name}": {token}}}'.encode(), None
    obj = dict(VALID[cls])
    name = draw(st.sampled_from(sorted(obj)))
    if kind == "dropped":
        del obj[name]
    else:
        obj[name] = draw(values | st.text(max_size=8))
    return render(obj, True), obj


@pytest.mark.parametrize("cls", [TeacherRequest, TeacherLabel, RetrainRequest])
def test_record_parsers_return_a_well_typed_record_or_one_line(cls):
    @FUZZ
    @given(case=record_values(cls))
    def check(case):
        raw, obj = case
        result = cls.parse(raw)
        if isinstance(result, str):
            assert one_line(result, 400), result
            # refused only when the object really is unusable
            assert obj is None or not well_formed(cls, obj) or not json_safe(obj), (obj, result)
            return
        assert isinstance(result, cls)
        for name, kind in cls.__annotations__.items():
            assert KINDS[kind](getattr(result, name)), (name, getattr(result, name))
        assert filled(cls, result)
        # the worker re-sends these fields in its own records: strict JSON, UTF-8
        strict_json(json.dumps(result.asdict(), ensure_ascii=False).encode("utf-8"))

    check()


@pytest.mark.parametrize(
    ("cls", "field", "value", "expected"),
    [
        (TeacherRequest, "ts", "soon", "a teacher request needs ts as float, got str"),
        (TeacherRequest, "extra", [1], "a teacher request needs extra as dict, got list"),
        (TeacherRequest, "student_confidence", True, "a teacher request needs student_confidence as float, got bool"),
        (TeacherLabel, "usage", "free", "a teacher label needs usage as dict, got str"),
        (TeacherLabel, "labelled_at", None, "a teacher label needs labelled_at as float, got NoneType"),
        (RetrainRequest, "round", 2.5, "a retrain request needs round as int, got float"),
        (RetrainRequest, "target_classes", "refund", "a retrain request needs target_classes as list, got str"),
        (RetrainRequest, "model_version", 7, "a retrain request needs model_version as Optional[str], got int"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_by_name(cls, field, value, expected):
    """Found by the fuzz test: faust's from_data checks no type, so these were accepted."""
    assert cls.parse(json.dumps(VALID[cls] | {field: value}).encode()) == expected


@pytest.mark.parametrize("cls", [TeacherRequest, TeacherLabel, RetrainRequest])
def test_a_nesting_bomb_or_nan_is_a_reason_not_an_exception(cls):
    """Found by the fuzz test: a deep array raised RecursionError out of parse(); a NaN ts
    or an int of 400 digits was accepted (and raised later, in the worker's arithmetic)."""
    assert cls.parse(b"[" * 100_000).endswith("ValueError: nested deeper than 64 levels")
    assert cls.parse(json.dumps(VALID[cls] | {"ts": math.nan}).encode()).endswith("NaN is not valid JSON")
    assert cls.parse(json.dumps(VALID[cls] | {"ts": 2**64}).encode()).endswith(
        "ValueError: number 18446744073709551616 is out of range")  # no float or int64 holds it
    assert isinstance(cls.parse(json.dumps(VALID[cls]).encode()), cls)


# --- teacher answers -----------------------------------------------------------------

label_spellings = st.sampled_from(TAXONOMY) | st.sampled_from(
    ["Card Lost", "card-lost", "REFUND", " refund ", "HACKED", "card", "", "__not_in_taxonomy__", "card_lost\n"]
) | st.text(max_size=10)
answer_items = st.fixed_dictionaries(
    {},
    optional={
        "i": st.integers(-2, 6) | st.booleans() | st.floats() | st.text(max_size=2) | st.none(),
        "label": label_spellings | values,
        "text": st.text(max_size=40) | st.sampled_from(LONE_SURROGATES) | values,
    },
) | values


@st.composite
def answers(draw, key: str) -> str:
    """Near-valid teacher answers: the object, in a fence, in prose, cut short, or garbage."""
    kind = draw(st.sampled_from(["object", "fenced", "prose", "cut", "text", "bomb"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "bomb":
        return draw(st.sampled_from(["[", "{", '{"labels": [', '{"samples": ['])) + "[" * draw(st.sampled_from(NESTING))
    obj = {draw(st.sampled_from([key, key, "labels", "samples", "answer"])): draw(st.lists(answer_items, max_size=8))}
    body = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if kind == "fenced":
        return f"Sure.\n```json\n{body}\n```"
    if kind == "prose":
        return f"Here you go: {body} hope it helps {{not json}}"
    if kind == "cut":
        return body[: draw(st.integers(0, len(body)))]
    return body


@FUZZ
@given(content=answers("labels"), n=st.integers(0, 5))
def test_parse_labels_gives_n_taxonomy_labels_or_response_format_error(content, n):
    try:
        labels = parse_labels(content, n, TAXONOMY)
    except ResponseFormatError as err:
        # a preview of 80 characters, escaped by repr: up to 10 characters each
        assert one_line(str(err), 1000) and str(err).startswith("invalid_json: ")
        return
    assert len(labels) == n
    assert all(label is None or label in TAXONOMY for label in labels)
    # positive: the first well-formed entry of each i is taken
    try:
        items = json.loads(content).get("labels")
    except (ValueError, AttributeError, RecursionError):
        return
    seen: set = set()
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and type(item.get("i")) is int and 0 <= item["i"] < n and item["i"] not in seen:
            seen.add(item["i"])
            if item.get("label") in TAXONOMY:
                assert labels[item["i"]] == item["label"]


@FUZZ
@given(content=answers("samples"), targets=st.none() | st.lists(st.sampled_from(TAXONOMY), min_size=1, unique=True))
def test_parse_samples_keeps_only_clean_samples_and_counts_the_rest(content, targets):
    known = ["where is my card", "I want a refund"]
    samples, rejected = parse_samples(content, TAXONOMY, known, targets)
    assert set(rejected) <= set(SAMPLE_REJECT_REASONS) and all(n > 0 for n in rejected.values())
    allowed = set(targets) if targets is not None else set(TAXONOMY)
    assert all(label in allowed for label in samples.labels)
    keys = [normalize_text(t) for t in samples.texts]
    assert all(k and utf8(t) and not echoes_prompt(t) for k, t in zip(keys, samples.texts, strict=True))
    assert len(set(keys)) == len(keys) and not set(keys) & {normalize_text(t) for t in known}
    if "invalid_json" in rejected:
        assert rejected == {"invalid_json": 1} and len(samples) == 0
        return
    try:
        items = json.loads(content)["samples"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return  # fenced or in prose: the same object, found by a longer way
    assert len(samples) + sum(rejected.values()) == len(items)  # every item kept or counted once


def test_a_nesting_bomb_answer_is_a_response_format_error():
    """Found by the fuzz test: RecursionError escaped parse_labels (and the teacher's retry loop)."""
    with pytest.raises(ResponseFormatError, match="^invalid_json: answer is not a JSON object: "):
        parse_labels("[" * 100_000, 1, TAXONOMY)
    assert parse_samples('{"samples": ' + "[" * 100_000, TAXONOMY) == parse_samples("nope", TAXONOMY)


def test_a_sample_that_is_not_valid_unicode_is_malformed():
    """Found by the fuzz test: a lone surrogate escape became a training text no store can encode."""
    samples, rejected = parse_samples('{"samples": [{"text": "lost \\ud800 card", "label": "card_lost"}, '
                                      '{"text": "my card is lost", "label": "card_lost"}]}', TAXONOMY)
    assert samples.texts == ("my card is lost",) and rejected == {"malformed_sample": 1}


# --- cached teacher answers ------------------------------------------------------------


class CannedRedis:
    """Answers MGET with canned values: the cache's decoding without a Redis."""

    def __init__(self, values):
        self.values = values

    async def mget(self, keys):
        return self.values[: len(keys)]


cached_values = st.none() | st.binary(max_size=80) | values.map(lambda v: render(v, True)) | st.builds(
    lambda label, model, ts: render({"label": label, "teacher_model": model, "ts": ts}, True),
    label_spellings | values, st.text(max_size=5) | values, st.floats() | st.text(max_size=5) | values,
) | st.sampled_from([b"[" * 100_000, b'{"label": "refund", "teacher_model": "m", "ts": 1e999}',
                                 b'{"label": "refund", "teacher_model": "m", "ts": ' + b"9" * 400 + b"}"])


@FUZZ
@given(raw=st.lists(cached_values, min_size=1, max_size=4))
def test_a_garbage_cache_entry_is_a_miss(raw):
    cache = TeacherCache(CannedRedis(raw), TAXONOMY)
    hits = asyncio.run(cache.get_many([f"text {i}" for i in range(len(raw))]))
    assert len(hits) == len(raw)
    for value, hit in zip(raw, hits, strict=True):
        if hit is None:
            continue
        assert isinstance(hit, CachedLabel) and hit.label in TAXONOMY and math.isfinite(hit.ts)
        assert json.loads(value)["label"] == hit.label


def test_a_cache_entry_with_a_non_finite_time_or_a_bomb_is_a_miss():
    """Found by the fuzz test: "ts": "nan" became labelled_at=NaN; a deep array raised RecursionError,
    an int of 400 digits OverflowError."""
    good = json.dumps({"label": "refund", "teacher_model": "m", "ts": 5.0}).encode()
    raw = [b"[" * 100_000, json.dumps({"label": "refund", "teacher_model": "m", "ts": "nan"}).encode(),
           json.dumps({"label": "refund", "teacher_model": "m", "ts": 10**400}).encode(), good]
    hits = asyncio.run(TeacherCache(CannedRedis(raw), TAXONOMY).get_many(["a", "b", "c", "d"]))
    assert hits == [None, None, None, CachedLabel("refund", "m", 5.0)]


# --- model manifests ---------------------------------------------------------------------

FILES = {"model.safetensors": b"\x00weights\x01" * 50, "config.json": b'{"a": 1}', "labels.json": b'{"labels": []}'}


def make_version(store: Path, version: str = "v0001") -> dict:
    """A version directory with its correct manifest; returns the manifest."""
    path = store / version
    path.mkdir(parents=True)
    for name, data in FILES.items():
        (path / name).write_bytes(data)
    manifest = {"version": version, "files": {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def offline_registry(store: Path) -> Registry:
    # Reading and verifying versions never touches Redis; nothing listens on port 9.
    return Registry(store, "redis://127.0.0.1:9/0", timeout_s=0.1)


@st.composite
def manifests(draw, good: dict) -> bytes:
    kind = draw(st.sampled_from(["binary", "value", "files", "hash", "name", "version"]))
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "value":
        return render(draw(values), draw(st.booleans()))
    manifest = json.loads(json.dumps(good))
    files = manifest["files"]
    if kind == "files":
        manifest["files"] = draw(values)
    elif kind == "hash":
        name = draw(st.sampled_from(sorted(files)))
        files[name] = draw(values | st.text(max_size=70) | st.sampled_from(["0" * 64, "G" * 64, files[name].upper()]))
    elif kind == "name":
        name = draw(st.sampled_from(sorted(files)))
        new = draw(st.sampled_from(["../../etc/passwd", "/etc/passwd", "../v0002/model.safetensors", "./config.json",
                                    "sub/../config.json", "missing.bin", "model.safetensors\n", "nul\x00l", ""])
                   | st.text(max_size=20))
        files[new] = files.pop(name) if draw(st.booleans()) else files[name]
    else:
        manifest["version"] = draw(values)
    return render(manifest, draw(st.booleans()))


def test_any_manifest_but_the_right_one_is_refused_in_one_line(tmp_path, monkeypatch):
    good = make_version(tmp_path)
    registry = offline_registry(tmp_path)
    assert registry.verify("v0001") == good
    version_dir = (tmp_path / "v0001").resolve()
    hashed: list[Path] = []
    real_sha256 = registry_module.sha256_file

    def spy(path: Path) -> str:
        hashed.append(path)
        return real_sha256(path)

    monkeypatch.setattr(registry_module, "sha256_file", spy)

    @FUZZ
    @given(raw=manifests(good))
    def check(raw):
        try:
            same = json.loads(raw) == good
        except (ValueError, RecursionError):
            same = False
        assume(not same)
        (version_dir / "manifest.json").write_bytes(raw)
        hashed.clear()
        with pytest.raises(ModelIntegrityError) as err:
            registry.verify("v0001")
        message = str(err.value)
        assert message.startswith("v0001 refused: ") and one_line(message, 400), message
        # whatever the manifest names, nothing outside the version directory is read
        assert all(p.resolve().parent == version_dir for p in hashed), hashed

    check()


def test_a_manifest_naming_a_file_outside_the_version_is_refused_unread(tmp_path, monkeypatch):
    good = make_version(tmp_path)
    make_version(tmp_path, "v0002")
    outside = tmp_path / "v0002" / "model.safetensors"
    hashed: list[Path] = []
    monkeypatch.setattr(registry_module, "sha256_file", lambda p: hashed.append(p) or hashlib.sha256(
        Path(p).read_bytes()).hexdigest())
    registry = offline_registry(tmp_path)
    for name in ("../v0002/model.safetensors", str(outside), "../../../../../../etc/hostname"):
        files = dict(good["files"]) | {name: hashlib.sha256(outside.read_bytes()).hexdigest()}  # right sha256
        (tmp_path / "v0001" / "manifest.json").write_text(json.dumps(good | {"files": files}))
        with pytest.raises(ModelIntegrityError) as err:
            registry.verify("v0001")
        assert str(err.value).startswith("v0001 refused: ") and "is missing (listed in manifest.json)" in str(err.value)
        assert hashed == []


def test_a_symbolic_link_in_a_version_is_refused(tmp_path):
    """Found while fuzzing: a link beside the weights, listed with the right sha256,
    made verify hash (and load) a file outside the version directory."""
    good = make_version(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    (tmp_path / "v0001" / "notes.txt").symlink_to(secret)
    files = good["files"] | {"notes.txt": hashlib.sha256(secret.read_bytes()).hexdigest()}
    (tmp_path / "v0001" / "manifest.json").write_text(json.dumps(good | {"files": files}))
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: notes\.txt is a symbolic link in .*/v0001$"):
        offline_registry(tmp_path).verify("v0001")
    (tmp_path / "v0001" / "notes.txt").unlink()
    (tmp_path / "v0001" / "manifest.json").unlink()
    (tmp_path / "v0001" / "manifest.json").symlink_to(tmp_path / "v0002.json")
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: manifest\.json is a symbolic link in "):
        offline_registry(tmp_path).verify("v0001")


def test_a_file_name_with_a_newline_keeps_the_message_on_one_line(tmp_path):
    """Found by the fuzz test: names went into the message as they were."""
    good = make_version(tmp_path)
    files = good["files"] | {"evil\nname": "0" * 64}
    (tmp_path / "v0001" / "manifest.json").write_text(json.dumps(good | {"files": files}))
    with pytest.raises(ModelIntegrityError) as err:
        offline_registry(tmp_path).verify("v0001")
    assert str(err.value).startswith("v0001 refused: 'evil\\nname' is missing (listed in manifest.json) in ")
    (tmp_path / "v0001" / "manifest.json").write_bytes(b"[" * 100_000)
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: manifest\.json is unreadable \(nested too deeply\)"):
        offline_registry(tmp_path).verify("v0001")


@pytest.mark.parametrize("name", ["v0003\n", "v0003 ", "../v0003", "v003", "v0003/../v0001", ""])
def test_only_version_names_reach_the_store(tmp_path, name):
    """Found by the fuzz test of model.updates: "v0003\\n" passed as a version name ("$" matches before a newline)."""
    with pytest.raises(RegistryError, match="^not a version name: "):
        version_number(name)
    with pytest.raises(RegistryError, match="^not a version name: "):
        offline_registry(tmp_path).verify(name)
