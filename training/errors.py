"""Errors a training command reports in one line (training/commands.py maps them to exit codes)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on (the message says why)."""


class CommandRefused(RuntimeError):
    """A command decided not to do what it was asked, on purpose (exit 3): e.g. the catalogue
    refresh's quality guard keeping the current version."""
