"""Errors that end one frame (and never the daemon).

Every step that refuses a frame raises a :class:`FrameStop`: the class says
which state the frame goes to, the instance carries a short machine-readable
reason (``truncated``, ``no_log_entry``, ``too_few_matches``) and a human
sentence with the evidence. :mod:`photd.pipeline` has one ``except FrameStop``
that hands both to the store unchanged.
"""

from __future__ import annotations


class FrameStop(Exception):
    """A step ended this frame: ``state`` (class-level) and ``reason`` go to the store.

    Parameters
    ----------
    reason : str
        Machine-readable reason, stored as the frame's state reason.
    message : str
        A sentence with the evidence (the log's ``error`` field).
    """

    state = "failed"

    def __init__(self, reason: str, message: str) -> None:
        # both in args: the exception pickles back from a worker process intact
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class FrameRejected(FrameStop):
    """The frame cannot be processed as it is (not an image, unreadable, wrong shape)."""


class WaitForLog(FrameStop):
    """The log does not say enough yet (no coordinates and no resolvable name)."""

    state = "waiting_log"


class WaitForCatalog(FrameStop):
    """No reference stars for the field yet; the frame is taken up again later."""

    state = "waiting_catalog"
