"""Contrastive losses, one per paper family. Each returns the loss with the logits and targets it
was computed from, so a method can report instance-discrimination accuracy without recomputing."""

from training.losses.result import ContrastiveResult

__all__ = ["ContrastiveResult"]
