"""Offline builders shared by softalign's tests and its users' tests: tiny pipelines and local tokenizers."""

from .pipelines import FAMILIES, tiny_pipeline
from .tokenizers import clip_tokenizer, t5_tokenizer

__all__ = ["FAMILIES", "clip_tokenizer", "t5_tokenizer", "tiny_pipeline"]
