"""Shared fixtures of the fast layer: a tiny randomly initialised BERT, so
anything that trains or predicts runs in seconds on a CPU."""

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from pgkd.student import default_encoder_path

# Two cores on the CI box; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A directory like a hub encoder (config, model.safetensors, tokenizer):
    a 2-layer, 32-wide BERT with the MiniLM vocabulary, random weights (seed 0)."""
    path = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
