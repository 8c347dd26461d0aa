"""What serving a saved student takes beyond its forward pass, without torch:
its label map (``labels.json``, written by :meth:`pgkd.student.Student.save`),
the check that a directory holds safetensors weights and no pickle file,
and the plan that cuts a batch of texts into forward passes of similar length.
Both students use it: :class:`pgkd.student.Student` and the torch-free
:class:`pgkd.graph_student.GraphStudent`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pgkd.errors import ModelError, first_line

LABELS_FILE = "labels.json"
WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX = "model.safetensors.index.json"  # what save_pretrained writes for large models
# torch.save / pickle formats (pytorch_model.bin, training_args.bin, *.pt, ...): never in a directory we load
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What one forward pass costs beyond its tokens, in tokens: MiniLM-L6 on one CPU thread
# spends ~0.21 ms per token and ~1.5-4 ms (ONNX Runtime) to ~10 ms (TorchScript) per pass
# whatever its size (docs/BENCHMARKS.md, "planned passes"); 16-64 measured alike.
PASS_OVERHEAD_TOKENS = 24
TOKENIZE_CHUNK = 4096  # texts tokenized at once by Student.batches (bounds the padded array)


def check_model_dir(path: Path) -> None:
    """ModelError unless ``path`` is a directory with safetensors weights and no
    pickle file: what :meth:`pgkd.student.Student.load` reads, checked before
    anything imports torch (the graph builder's child fails in ~1 s, not ~10)."""
    if not path.is_dir():
        raise ModelError(f"model directory not found: {path}")
    if not (path / WEIGHTS_FILE).is_file() and not (path / SHARDED_INDEX).is_file():
        raise ModelError(
            f"{path} has no {WEIGHTS_FILE}; only safetensors checkpoints are loaded "
            "(pickle files such as pytorch_model.bin are refused)"
        )
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path} holds a pickle file ({pickles[0]!r}); only safetensors checkpoints are loaded: remove it"
        )


def read_labels(path: Path) -> tuple[list[str], int]:
    """(labels, max_length) from the labels.json that :meth:`Student.save` writes."""
    if not (path / LABELS_FILE).is_file():
        raise ModelError(f"{path} has no {LABELS_FILE}; expected a directory written by Student.save()")
    try:
        meta = json.loads((path / LABELS_FILE).read_text(encoding="utf-8"))
        return list(meta["labels"]), int(meta["max_length"])
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path / LABELS_FILE} is not a valid label map: {first_line(err)}") from None


def plan_passes(lengths: Sequence[int], max_size: int,
                overhead_tokens: float = PASS_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Cut texts sorted by token count (``lengths`` ascending) into forward passes
    ``[start, end)`` of at most ``max_size`` texts, at the least cost: each pass
    costs ``overhead_tokens`` plus its texts times its longest (what it computes,
    padding included). Exact, by dynamic programming over the cut points:
    O(len(lengths) * max_size).

    >>> plan_passes([9, 10, 11, 40], 16, overhead_tokens=24)  # the long one alone: 24+33 + 24+40 < 24+160
    [(0, 3), (3, 4)]
    >>> plan_passes([9, 10, 11, 12], 16, overhead_tokens=24)  # alike: one pass
    [(0, 4)]
    >>> plan_passes([10] * 5, 2)
    [(0, 1), (1, 3), (3, 5)]
    """
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: the least cost of the first j texts
    cut = [0] * (n + 1)  # cut[j]: where the last pass of that plan starts
    for j in range(1, n + 1):
        longest = lengths[j - 1]  # sorted: a pass that ends at j pads to this
        for i in range(max(0, j - max_size), j):
            cost = best[i] + overhead_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], n
    while j > 0:
        passes.append((cut[j], j))
        j = cut[j]
    return passes[::-1]

