"""Reward and metric models for text-to-image post-training and evaluation, from local weights only."""

from .clip_core import CLIPCore

__all__ = ["CLIPCore"]
