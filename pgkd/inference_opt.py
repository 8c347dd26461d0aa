"""Int8 inference for the served student (``PGKD_INFERENCE_QUANTIZE=int8``).

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
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import torch

from pgkd.errors import ModelError

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
