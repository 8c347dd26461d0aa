"""PGKD: performance-guided LLM knowledge distillation for text classification.

The core library: data, student, training, report, mining, teacher, loop,
registry. The Faust application in ``streams/`` calls into it.
"""

__version__ = "0.1.0"
