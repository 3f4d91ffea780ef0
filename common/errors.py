"""Every error omnistream raises on purpose, in one place (Megatron-Energon keeps its own the same way).

Who catches what:

    UserError            the CLI: one line on stderr, exit status 2, no traceback (a bad config, no shards,
                         a vocabulary mismatch, an unreachable cluster)
    BadSample            the pipeline: the record is skipped, counted under `reason` and listed in the
                         dead-letter file; it never ends a run
    ErrorRateExceeded    the driver: too many of the first records were bad, so the data is probably wrong;
                         the run ends FAILED with the reason (a UserError at the CLI)
    DataOrderError       the training loop: a micro-batch reached a rank out of the stream's order
    DataResumeMismatch   the row stream: a resumed stream is not the one the checkpoint consumed
    ConformanceError     `check_modality`: a plugin breaks the protocol (an AssertionError, so pytest shows it)

Standard library only: a plugin, a pipeline stage and the trainer import these without importing each other.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the user's (bad config, missing plugin, wrong vocabulary).

    The CLI prints the message as one line and exits with status 2.
    """


class BadSample(ValueError):
    """Raised for input bytes a modality cannot (or must not) turn into tokens.

    The pipeline catches it, counts the record under ``reason`` and lists it in
    the dead-letter file; it never ends a run (docs/architecture.md, Errors).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ErrorRateExceeded(RuntimeError):
    """Too many of the first records were bad: the user probably pointed at the wrong data."""


class DataOrderError(RuntimeError):
    """A micro-batch reached a rank out of the stream's order (rows repeated, skipped or misrouted)."""


class DataResumeMismatch(RuntimeError):
    """The stream rebuilt for a resume differs from the one the checkpoint consumed."""


class ConformanceError(AssertionError):
    """A modality plugin breaks the protocol; the message names the plugin and the check."""
