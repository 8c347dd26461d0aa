"""Fast-layer settings. The tiny random BERT (``tiny_encoder_dir``) lives in
tests/conftest.py, so integration tests can use it too."""

import torch

# Two cores on the CI box; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))
