"""Serving-only forms of the student: int8 weights (``PGKD_INFERENCE_QUANTIZE=int8``)
and the forward pass as one TorchScript graph (``PGKD_INFERENCE_GRAPH=torchscript``).

Int8.

Dynamic quantization: each Linear layer of the encoder keeps its weights as int8
(symmetric, one scale per output channel) and quantizes its input per batch, so
no calibration data is needed. On a CPU the encoder's Linear layers are three
quarters of the inference time (py-spy, docs/BENCHMARKS.md); with int8 kernels
the whole model runs about 1.5x faster.

Why not ``torch.ao.quantization.quantize_dynamic``: its layers quantize their
inputs to 7 bits on x86 (``reduce_range=True``, so that the pairwise int16 sums
of pre-VNNI AVX2 kernels cannot saturate). That costs ~3 accuracy points on
Banking77 with a linear-probe head; full 8-bit inputs and per-channel weights
keep accuracy. So inputs use the full 8 bits where the CPU has VNNI (int32
accumulation, no saturation) and 7 bits elsewhere.

TorchScript. transformers' forward pass is a few hundred small Python calls; at
batches of 8-16 texts on a CPU the interpreter between torch ops is a fifth of
its time, and it holds the GIL all along, so the classifier's event loop
(Kafka I/O, JSON) and its inference thread take turns instead of sharing the two
cores: a Python thread busy 30% of the time made eager batches of 8 1.8x slower.
:func:`trace_forward` records the forward once with ``torch.jit.trace``; the
graph then runs in TorchScript's C++ interpreter, which releases the GIL for the
whole call (the same busy thread: 1.16x). Same ops, same results: the trace is
checked against the eager model on padded and unpadded batches of several shapes
before it serves, and refused (:class:`TraceError`) when they differ, e.g. for
an architecture whose forward branches on its inputs' values.

``torch.jit`` is deprecated in favour of ``torch.compile``/``torch.export``, but
neither of those releases the GIL without a C++ toolchain at run time; when a torch
drops ``torch.jit``, :func:`trace_forward` raises TraceError and the worker
serves the eager model (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import torch

from pgkd.errors import GraphError, ModelError, first_line

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@cache
def cpu_has_vnni() -> bool:
    """True when /proc/cpuinfo lists an x86 VNNI flag (int8 dot products with int32 accumulation)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return False
    return any(flag in flags for flag in VNNI_FLAGS)


class Int8Linear(torch.nn.Module):
    """A frozen Linear layer: int8 weights (per output channel), input quantized per call."""

    def __init__(self, linear: torch.nn.Linear, full_range: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.full_range = full_range
        weight = linear.weight.detach().float()  # (out, in)
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        qweight = torch.quantize_per_channel(weight, scales, zeros, axis=0, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, not self.full_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, full_range={self.full_range}"


def quantize_linear_layers(module: torch.nn.Module, full_range: bool | None = None) -> int:
    """Replace every ``torch.nn.Linear`` inside ``module`` by an :class:`Int8Linear`,
    in place; returns how many were replaced. ``full_range=None``: 8-bit inputs
    where the CPU has VNNI, else 7-bit."""
    if full_range is None:
        full_range = cpu_has_vnni()
    targets = [(name, child) for name, child in module.named_modules() if type(child) is torch.nn.Linear]
    try:
        with warnings.catch_warnings():
            # torch marks its quantized tensors deprecated but ships them; the warning would
            # be printed on every worker start and hot swap.
            warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            replacements = [(name, Int8Linear(child, full_range)) for name, child in targets]
    except (AttributeError, RuntimeError) as err:
        raise ModelError(
            f"int8 inference needs torch's quantized CPU kernels, which torch {torch.__version__} lacks ({err}); "
            "serve fp32 (PGKD_INFERENCE_QUANTIZE=fp32)"
        ) from None
    for name, layer in replacements:
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer)
    return len(replacements)


def quantize_encoder(model: torch.nn.Module) -> int:
    """Quantize a transformers sequence classifier for serving, in place; returns
    the number of int8 layers. Every encoder layer but the last becomes int8; the
    last layer, the pooler and the head stay fp32: they feed the logits directly,
    and keeping them fp32 held Banking77 accuracy within the 0.5-point target where
    quantizing them too did not (docs/BENCHMARKS.md), for 1/6 of the speed-up."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 1:
        return sum(quantize_linear_layers(layer) for layer in layers[:-1])
    return quantize_linear_layers(base)  # an unknown layout: every Linear of the encoder


# --- TorchScript ---------------------------------------------------------------------

# Probe batches for the trace and its check: different lengths, so that the
# traced batch is padded (a forward that skips its attention mask when nothing is
# padded records that skip in the trace), then other batch sizes and lengths.
TRACE_EXAMPLE = ("a short probe", "a longer probe sentence, so that the first one of the batch is padded")
TRACE_CHECKS = (
    ("one text alone, nothing padded",),
    ("three texts", "of different lengths, to check", "that the graph is not fixed to one shape or batch size"),
)
TRACE_TOLERANCE = 1e-4  # max |logit difference|, relative to the largest |logit|


class TraceError(GraphError):
    """The forward pass cannot be served as a TorchScript graph (the eager model serves)."""


class _Logits(torch.nn.Module):
    """model(**inputs).logits with positional tensor inputs (what torch.jit.trace records)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors, strict=True))).logits


class TracedForward:
    """A sequence classifier's forward pass as one TorchScript graph: ``logits = traced(encoding)``."""

    def __init__(self, graph: torch.jit.ScriptModule, names: Sequence[str]):
        self.graph, self.names = graph, tuple(names)

    def __call__(self, encoding: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.graph(*(encoding[name] for name in self.names))


def check_graph(model: torch.nn.Module, forward, encode, tolerance: float, error: type[GraphError],
                what: str) -> None:
    """Raise ``error`` unless ``forward(encoding)``'s logits are within ``tolerance`` x
    their scale of the eager model's on the probe batches (:data:`TRACE_EXAMPLE`,
    padded; :data:`TRACE_CHECKS`: unpadded, other sizes and lengths)."""
    with torch.inference_mode():
        for texts in (TRACE_EXAMPLE, *TRACE_CHECKS):
            encoding = encode(list(texts))
            eager, got = model(**encoding).logits, forward(encoding)
            scale = max(1.0, float(eager.abs().max()))
            diff = float((eager - got).abs().max()) if eager.shape == got.shape else float("inf")
            if not diff <= tolerance * scale:  # NaN fails too
                raise error(f"{what}'s logits differ from the model's by {diff:.3g} on a batch of {len(texts)}")


def trace_forward(model: torch.nn.Module, encode) -> TracedForward:
    """Trace ``model`` (in eval mode, weights frozen) on padded example batches
    from ``encode(texts) -> encoding``; TraceError when tracing fails or the graph's
    logits differ from the eager model's on :data:`TRACE_CHECKS`."""
    example = encode(list(TRACE_EXAMPLE))
    if "attention_mask" in example and bool(example["attention_mask"].all()):
        raise TraceError("the example batch is not padded; cannot trace the padded path")
    names = tuple(example.keys())
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # torch.jit's FutureWarning, and TracerWarnings on Python branches that the
            # checks below catch when they matter
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(_Logits(model, names), tuple(example[n] for n in names), check_trace=False)
    except Exception as err:  # noqa: BLE001 - whatever torch.jit raises, the eager model serves
        raise TraceError(f"torch.jit.trace failed: {type(err).__name__}: {first_line(err)}") from None
    traced = TracedForward(graph, names)
    check_graph(model, traced, encode, TRACE_TOLERANCE, TraceError, "the traced graph")
    return traced
