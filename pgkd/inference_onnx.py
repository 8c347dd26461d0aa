"""The forward pass on ONNX Runtime (``PGKD_INFERENCE_GRAPH=onnxruntime``).

The eager fp32 model is exported to an ONNX graph (``torch.onnx.export``, the
TorchScript-based exporter: it needs no ``onnxscript``), checked against the eager
model on the same probe batches as the TorchScript trace (identical logits within
1e-4 of their scale), and run by an ONNX Runtime session on the CPU. With
``PGKD_INFERENCE_QUANTIZE=int8`` ONNX Runtime's dynamic quantization then turns
the weight MatMuls of every encoder layer but the last into int8 ones (weights
per output channel, inputs quantized per call with a scale and a zero point), the
same layers :func:`pgkd.inference_opt.quantize_encoder` quantizes in torch, and
the word-embedding table is stored in fp16 (:func:`halve_embedding_tables`: 65 ->
41 MB for MiniLM, which a hot swap hashes and loads faster).
The graph is saved with ONNX Runtime's fusions already applied
(:func:`optimize_offline`), so that a session of it starts in half the time, and
that saved graph is what is checked against the eager model last.

Why: torch's int8 kernels on a CPU without VNNI (AVX2 only) take 7-bit inputs,
which cost a point of Banking77 accuracy; ONNX Runtime's int8 MatMuls take full
8-bit inputs there too (docs/BENCHMARKS.md). The session releases the GIL while
it runs, like the TorchScript graph, and its per-op overhead is lower, which
counts at the small batches a lightly loaded stream makes.

The graph is built once, when a version is published (:func:`add_graph`, called by
:meth:`pgkd.registry.Registry.publish` for the trainer, ``pgkd models import`` and
the demo): it is stored in the version as ``onnx/model.<quantize>.onnx``, with its
sha256 in the manifest like every other file, so a worker that serves it verifies
and loads only a session (:func:`load_graph`, ~0.15 s for MiniLM). An ONNX file is
a protobuf graph of operators and weights, not code: loading it runs nothing of
its author's. A version without the graph (published before, by a publisher with
other settings, or whose build failed), or one this runtime cannot load, is built
when it is loaded, as before: in a child process (:func:`build_in_child`, this
module's ``main``; ~20 s on 2 cores) so that none of that Python holds the
worker's GIL. The child dies with its worker (``PR_SET_PDEATHSIG``), and a build
directory that a killed worker left behind is removed by a later build
(:func:`sweep_stale_builds`). In-process callers use :func:`export_forward`. A
model that does not export faithfully, or a machine without
``onnxruntime``/``onnx``, raises :class:`OnnxError` and the worker serves the
TorchScript graph instead (:mod:`pgkd.serving`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pgkd.errors import GraphError, first_line
from pgkd.priority import at_base_priority
from pgkd.registry import graph_file

if TYPE_CHECKING:  # torch is imported where a graph is built or torch tensors are asked for: a
    import torch  # worker that only loads a stored graph runs without it (pgkd.graph_student)

log = logging.getLogger(__name__)

OPSET = 17
# int8 logits differ from fp32 by the quantization error (a few % of their scale on
# MiniLM); this catches a broken graph (NaN, wrong inputs), not a point of accuracy,
# which docs/BENCHMARKS.md measures on the whole test split
INT8_TOLERANCE = 0.5
# an fp32 table read only by Gathers and at least this big is stored in fp16 (halve_embedding_tables);
# smaller ones (positions, token types: 512 x 384 and 2 x 384 in MiniLM) are not worth a Cast
EMBEDDING_MIN_ELEMENTS = 1 << 20
LAYER_RE = re.compile(r"/encoder/layer\.(\d+)/")
CHILD_TIMEOUT_S = 600.0  # a child that builds longer than this is given up (the worker serves torchscript)
BUILD_DIR_PREFIX = "pgkd-onnx-"  # a worker's temporary build directory (tempfile.gettempdir())
PR_SET_PDEATHSIG = 1  # prctl(2)


class OnnxError(GraphError):
    """The forward pass cannot be served by ONNX Runtime (another graph serves)."""


class OnnxForward:
    """A sequence classifier's forward pass as an ONNX Runtime session: ``logits = forward(encoding)``.

    ``run`` is thread-safe on one session, so lanes and clones share it. ``tokenizer``
    is ``"tokenizers"`` when the graph's builder checked that the ``tokenizers``
    library alone tokenizes as transformers does for this model
    (:func:`pgkd.graph_student.tokenizer_matches`): a worker may then serve it
    without torch (:class:`pgkd.graph_student.GraphStudent`)."""

    def __init__(self, session, names: Sequence[str], tokenizer: str = ""):
        self.session, self.names, self.tokenizer = session, tuple(names), tokenizer

    def __call__(self, encoding: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        feeds = {name: encoding[name].cpu().numpy() for name in self.names}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def export_forward(model: torch.nn.Module, encode, quantize: str = "fp32", threads: int | None = None) -> OnnxForward:
    """``model`` (eager, fp32, eval mode, on the CPU) as an ONNX Runtime session,
    int8 when ``quantize == "int8"``; OnnxError when it cannot be built or its
    logits differ from the eager model's."""
    with tempfile.TemporaryDirectory(prefix=BUILD_DIR_PREFIX) as tmp:
        path = Path(tmp) / "model.onnx"
        names = build_onnx(model, encode, quantize, path, threads)
        return OnnxForward(session(path.read_bytes(), threads), names)


def build_onnx(model: torch.nn.Module, encode, quantize: str, target: Path, threads: int | None = None) -> tuple:
    """Export ``model`` to ``target`` (int8 when asked), checked against the eager
    model at each step; returns the graph's input names. OnnxError when it fails."""
    import torch

    from pgkd.inference_opt import TRACE_EXAMPLE, TRACE_TOLERANCE, check_graph

    example = encode(list(TRACE_EXAMPLE))
    names = tuple(example.keys())
    fp32_path = target.with_name(target.stem + ".fp32.onnx")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
            torch.onnx.export(  # eval(): the exporter restores the wrapper's mode, and a new Module trains
                export_module(model, names).eval(), tuple(example[n] for n in names), str(fp32_path),
                input_names=list(names), output_names=["logits"], opset_version=OPSET, dynamo=False,
                dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, "logits": {0: "batch"}},
            )
        forward = OnnxForward(session(str(fp32_path), threads), names)
    except OnnxError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the exporter or the runtime raises, another graph serves
        raise OnnxError(f"ONNX export failed: {type(err).__name__}: {first_line(err)}") from None
    check_graph(model, forward, encode, TRACE_TOLERANCE, OnnxError, "the fp32 ONNX graph")
    if quantize == "int8":
        quantize_onnx(fp32_path, target, _layer_count(model))
        fp32_path.unlink()
        halve_embedding_tables(target)
        tolerance = INT8_TOLERANCE
    else:
        fp32_path.replace(target)
        tolerance = TRACE_TOLERANCE
    optimize_offline(target)
    check_graph(model, OnnxForward(session(str(target), threads), names), encode, tolerance, OnnxError,
                f"the {quantize} ONNX graph")
    return names


def export_module(model: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module:
    """What :func:`build_onnx` exports: ``model``'s logits from the positional
    inputs ``names``.

    A BERT sequence classifier (MiniLM, bert-base: absolute positions, a pooler)
    is exported through its own modules, with the attention mask built once a
    pass over token pairs (batch x 1 x tokens x tokens, added in every layer):
    a real token attends to the real tokens, a padding token to nothing (its row
    is all the most negative float: finite, so no NaN, and no real token reads
    it). Through transformers' forward the export holds its mask utilities and,
    in every layer, torch's fused attention taken apart with a key mask and a
    NaN guard. Same fp32 logits (1e-5). The int8 passes cost 4-13% less CPU at
    1-16 texts on the Xeon, more with more padding; their logits differ from
    the other export's by up to ~1 where a pass is padded (the padding rows
    enter the activations' quantization range), and Banking77 accuracy was
    77.05% against 76.82% (fp32: 77.24%; docs/BENCHMARKS.md, "Sequence
    packing"). Any other model is exported through transformers' forward."""
    import torch

    from pgkd.inference_opt import _Logits

    names = tuple(names)
    config = getattr(model, "config", None)
    bert = getattr(model, "bert", None)
    if not (type(model).__name__ == "BertForSequenceClassification" and getattr(bert, "pooler", None) is not None
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and {"input_ids", "attention_mask"} <= set(names) <= {"input_ids", "attention_mask", "token_type_ids"}):
        return _Logits(model, names)

    class BertLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            inputs = dict(zip(names, tensors, strict=True))
            ids, keep = inputs["input_ids"], inputs["attention_mask"] > 0
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            hidden = bert.embeddings(input_ids=ids, token_type_ids=inputs.get("token_type_ids"),
                                     position_ids=positions)
            pairs = keep[:, :, None] & keep[:, None, :]  # query and key both real tokens
            mask = torch.where(pairs[:, None, :, :], 0.0, torch.finfo(hidden.dtype).min)
            hidden = bert.encoder(hidden, attention_mask=mask).last_hidden_state
            return model.classifier(model.dropout(bert.pooler(hidden)))

    return BertLogits()


def optimize_offline(path: Path) -> None:
    """Rewrite the graph at ``path`` with ONNX Runtime's basic and extended
    optimizations applied (constant folding; the fused attention, layer norm,
    GELU and int8 MatMul kernels of the CPU provider). A session then starts
    without searching for them: ~0.15 s for int8 MiniLM against ~0.3 s, on the
    worker's load thread at every swap. Same kernels, same logits, same speed.
    Layout optimizations, which depend on the CPU, are left to each session
    (:func:`session` enables all). OnnxError when ONNX Runtime cannot do it."""
    import onnxruntime as ort

    optimized = path.with_name(path.stem + ".optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized.replace(path)
    except Exception as err:  # noqa: BLE001
        optimized.unlink(missing_ok=True)
        raise OnnxError(f"ONNX Runtime could not optimize the graph: {type(err).__name__}: {first_line(err)}") from None


def session(model: str | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of ``model`` (a path or the graph's bytes) with
    ``threads`` intra-op threads (default: torch's), all graph optimizations."""
    if not threads:
        import torch

        threads = torch.get_num_threads()
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxError("onnxruntime is not installed (pip install onnxruntime onnx)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # with 2+ threads ORT's pool spins between runs by default: on a few cores shared with the
    # event loop and the broker that is CPU taken from them (it changes nothing at 1 thread)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads == 1:  # no pool thread: the session loads at the caller's priority (a hot swap's: lowered)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    # the session starts its intra-op threads, which take the calling thread's nice value for
    # good: created on a hot swap's lowered load thread, they would serve the version at +10
    return at_base_priority(ort.InferenceSession, model, options, providers=["CPUExecutionProvider"])


def quantize_onnx(source: Path, target: Path, layers: int | None) -> int:
    """ONNX Runtime dynamic int8 quantization of ``source``'s weight MatMuls in
    encoder layers ``0 .. layers-2`` (every MatMul when ``layers`` is None: an
    unknown layout); returns how many nodes were chosen."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    chosen = []
    for node in graph.node:
        if node.op_type != "MatMul" or not any(name in weights for name in node.input):
            continue
        match = LAYER_RE.search(node.name)
        if layers is None or (match and int(match.group(1)) < layers - 1):
            chosen.append(node.name)
    if not chosen:
        raise OnnxError("no weight MatMul to quantize in the exported graph")
    try:
        with warnings.catch_warnings(), _without_preprocessing_advice():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_quantize=chosen)
    except Exception as err:  # noqa: BLE001
        raise OnnxError(f"ONNX int8 quantization failed: {type(err).__name__}: {first_line(err)}") from None
    return len(chosen)


def halve_embedding_tables(path: Path, min_elements: int = EMBEDDING_MIN_ELEMENTS) -> list[str]:
    """Store the graph's embedding tables in fp16: every fp32 initializer of at
    least ``min_elements`` values that only Gathers read (MiniLM's word embeddings,
    30522 x 384: 47 of the int8 graph's 65 MB) becomes an fp16 one, and each
    Gather of it is followed by a Cast back to fp32. The rows a batch gathers
    differ from fp32 by fp16's rounding (a relative 2^-11); the encoder after
    them computes in fp32 as before. Why: a smaller graph is hashed and loaded
    faster at every hot swap (a session of MiniLM's int8 graph in ~70 ms against
    ~130 ms, docs/BENCHMARKS.md), and a version takes 24 MB less to store.
    Returns the tables' names (none: the file is left as it was)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    halved = []
    for init in list(graph.initializer):
        nodes = readers.get(init.name, [])
        if (init.data_type != TensorProto.FLOAT or np.prod(init.dims) < min_elements or init.name in graph_outputs
                or not nodes or any(n.op_type != "Gather" or list(n.input).index(init.name) != 0 for n in nodes)):
            continue
        values = numpy_helper.to_array(init)
        if np.abs(values).max() > np.finfo(np.float16).max:
            continue  # fp16 cannot hold it
        table = values.astype(np.float16)
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(table, init.name + "_fp16"))
        for gather in nodes:
            at = list(graph.node).index(gather)
            out = gather.output[0]
            gather.input[0] = init.name + "_fp16"
            gather.output[0] = out + "_fp16"
            graph.node.insert(at + 1, helper.make_node("Cast", [out + "_fp16"], [out], name=gather.name + "_to_fp32",
                                                       to=TensorProto.FLOAT))
        halved.append(init.name)
    if halved:
        onnx.save(model, str(path))
    return halved


# --- building in a child process (the workers' loads) ----------------------------------


def build_in_child(model_dir: Path, quantize: str, threads: int, nice: int = 10,
                   timeout_s: float = CHILD_TIMEOUT_S) -> OnnxForward:
    """The served graph of the :meth:`pgkd.student.Student.save` directory
    ``model_dir``, built by :func:`build_graph_in_child`, loaded here as a session."""
    graph, names, tokenizer = build_graph_in_child(model_dir, quantize, threads, nice, timeout_s)
    return OnnxForward(session(graph, threads), names, tokenizer)


def build_graph_in_child(model_dir: Path, quantize: str, threads: int = 1, nice: int = 10,
                         timeout_s: float = CHILD_TIMEOUT_S) -> tuple[bytes, tuple[str, ...], str]:
    """The checked graph of the :meth:`pgkd.student.Student.save` directory
    ``model_dir``, its input names and what may tokenize for it (``"tokenizers"``
    or ``""``: :class:`OnnxForward`), built by ``python -m pgkd.inference_onnx`` in
    a child process running at nice value ``nice`` (its own interpreter: the export
    and the quantizer never hold this process's GIL, which a worker's event loop
    and inference thread need). OnnxError with the child's reason when it fails."""
    sweep_stale_builds(Path(tempfile.gettempdir()), older_than_s=timeout_s + 60)
    with tempfile.TemporaryDirectory(prefix=BUILD_DIR_PREFIX) as tmp:
        target = Path(tmp) / "model.onnx"
        command = [sys.executable, "-m", "pgkd.inference_onnx", str(model_dir), str(target), "--quantize", quantize,
                   "--threads", str(threads), "--nice", str(nice), "--parent", str(os.getpid())]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise OnnxError(f"building the ONNX graph took over {timeout_s:.0f}s") from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise OnnxError(lines[-1] if lines else f"the ONNX graph builder exited with {done.returncode}")
        try:
            answer = json.loads(done.stdout.strip().splitlines()[-1])
            graph = target.read_bytes()
        except (ValueError, IndexError, OSError) as err:
            raise OnnxError(f"the ONNX graph builder gave no graph: {first_line(err)}") from None
        if hashlib.sha256(graph).hexdigest() != answer.get("sha256"):
            raise OnnxError("the built ONNX graph does not match the checksum its builder reported")
    return graph, tuple(answer["inputs"]), str(answer.get("tokenizer", ""))


# --- graphs stored with a version (built when it is published) ---------------------------


def add_graph(model_dir: Path, quantize: str, threads: int = 1) -> dict:
    """Build the checked graph of the saved student in ``model_dir`` (in a child
    process, from the files just written) and store it there as
    :func:`graph_file`; returns its manifest entry (``graphs[quantize]``).
    OnnxError when it cannot be built; nothing is left in ``model_dir`` then."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxError("onnxruntime is not installed (pip install onnxruntime onnx)") from None
    import torch

    started = time.perf_counter()
    graph, names, tokenizer = build_graph_in_child(model_dir, quantize, threads)
    target = model_dir / graph_file(quantize)
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(graph)
    log.info("built the %s ONNX graph of %s in %.1fs (%.0f MB)", quantize, model_dir.name,
             time.perf_counter() - started, len(graph) / 1e6)
    entry = {"file": graph_file(quantize), "inputs": list(names), "opset": OPSET,
             "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    return entry | ({"tokenizer": tokenizer} if tokenizer else {})


def load_graph(model_dir: Path, entry: Mapping, threads: int) -> OnnxForward:
    """A session of the graph a version stores (``entry``: its manifest's
    ``graphs[quantize]``; the caller has verified its checksum). It was checked
    against the eager model when it was built, so only the session loads here:
    ~0.15 s for MiniLM against ~20 s to build it. OnnxError when it does not load
    or its inputs are not the ones the entry names."""
    try:
        forward = OnnxForward(session(str(model_dir / entry["file"]), threads), entry["inputs"],
                              entry.get("tokenizer", ""))
        inputs = [i.name for i in forward.session.get_inputs()]
    except OnnxError:
        raise
    except Exception as err:  # noqa: BLE001 - a graph this runtime cannot load: build one instead
        raise OnnxError(f"the stored ONNX graph does not load: {type(err).__name__}: {first_line(err)}") from None
    if sorted(inputs) != sorted(forward.names):
        raise OnnxError(f"the stored ONNX graph takes {inputs}, its manifest says {list(forward.names)}")
    return forward


def sweep_stale_builds(tmp: Path, older_than_s: float) -> list[Path]:
    """Remove build directories (``pgkd-onnx-*`` under ``tmp``) left by a worker
    killed while its child built a graph (a killed worker cleans nothing up).
    Only those untouched for ``older_than_s``: a live build is killed at the
    child timeout, so an older directory has no owner. Returns what was removed."""
    removed = []
    cutoff = time.time() - older_than_s
    for path in tmp.glob(BUILD_DIR_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path)
                removed.append(path)
    if removed:
        log.info("removed %d stale ONNX build director%s", len(removed), "y" if len(removed) == 1 else "ies")
    return removed


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so a
    graph build does not outlive a worker killed mid-build; exit at once if
    ``parent`` is already gone. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here: the build still ends at its own pace
    if os.getppid() != parent:  # the parent died before the prctl: nobody waits for this build
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """``python -m pgkd.inference_onnx MODEL_DIR TARGET``: build the checked graph
    (what :func:`build_in_child` runs); prints {"sha256", "inputs", "tokenizer"}
    as JSON (``tokenizer``: :func:`pgkd.graph_student.tokenizer_matches`)."""
    import argparse

    from pgkd.errors import ModelError
    from pgkd.passes import check_model_dir

    p = argparse.ArgumentParser(description="Export a saved student to a checked ONNX graph (int8 when asked).")
    p.add_argument("model_dir", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("--quantize", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=0, help="run at this nice value (or the inherited one, if higher)")
    p.add_argument("--parent", type=int, help="die with this process (the worker that waits for the graph)")
    args = p.parse_args(argv)
    if args.parent:
        die_with_parent(args.parent)
    # a child of a thread at nice 10 starts at 10: +10 more would be 19, which on busy
    # cores gets ~2% of a core and took 30-40 s to build
    if args.nice > os.nice(0):
        os.nice(args.nice - os.nice(0))
    try:
        check_model_dir(args.model_dir)  # before torch's import: a wrong directory is said in ~1 s, not ~10
    except ModelError as err:
        print(f"ModelError: {err}", file=sys.stderr)
        return 1
    import torch

    from pgkd.graph_student import CHECKED, tokenizer_matches
    from pgkd.inference_opt import TRACE_EXAMPLE
    from pgkd.student import Student

    torch.set_num_threads(args.threads)
    try:
        student = Student.load(args.model_dir, device="cpu")
        student.model.eval()
        names = build_onnx(student.model, student.encode, args.quantize, args.target, args.threads)
    except (OnnxError, ModelError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    differs = tokenizer_matches(student, args.model_dir, TRACE_EXAMPLE)
    if differs:  # the graph still serves, with transformers' tokenizer
        print(f"served with transformers' tokenizer: {differs}", file=sys.stderr)
    digest = hashlib.sha256(args.target.read_bytes()).hexdigest()
    print(json.dumps({"sha256": digest, "inputs": list(names), "tokenizer": "" if differs else CHECKED}))
    return 0


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """Drop the quantizer's "consider pre-processing" warning (it goes to the root
    logger on every call; shape inference, what it advises, changes nothing here)."""
    root = logging.getLogger()
    advice = _DropMessage("pre-processing before quantization")
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def _layer_count(model: torch.nn.Module) -> int | None:
    import torch

    layers = getattr(getattr(getattr(model, "base_model", model), "encoder", None), "layer", None)
    return len(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) > 1 else None



if __name__ == "__main__":
    raise SystemExit(main())
