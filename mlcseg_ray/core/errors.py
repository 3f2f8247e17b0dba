"""The errors a user can act on, in one place: the CLI maps each to one line and an exit code (``cli/errors.py``)."""

from __future__ import annotations


class BadImage(Exception):
    """An input image that cannot be used; the message is the reason shown in its error row."""


class UnsafeImageId(BadImage):
    """An image id that cannot name an output file inside the run folder: that image's error row."""


class RunLocked(RuntimeError):
    """Another live run holds the run folder."""


class StageOrderError(RuntimeError):
    """A stage was asked for whose inputs are missing or were made with another configuration."""


class StageFailed(RuntimeError):
    """A stage stopped on an error (its ``__cause__``); the run folder records what finished before it."""

    def __init__(self, stage: str, cause: BaseException, where: object = None) -> None:
        super().__init__(f"{stage}: {cause}")
        self.stage, self.where = stage, where  # where: the run folder, for errors that name no file


class NoUsableImages(RuntimeError):
    """Every image failed at ingest: there is nothing for the later stages to do (each failure is an error row)."""


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the address the user gave."""


class ClusterAuthError(PermissionError):
    """The Ray cluster wants a token this machine does not have, or refused the one sent."""


class FitMismatch(ValueError):
    """A fit (``--fit RUN``) that does not apply to this run: another feature space or shape (exit 2)."""


class NoRunYet(ValueError):
    """A run folder that holds no run, and no input given to start one."""

    def __init__(self, root: object) -> None:
        super().__init__(f"{root} holds no run yet: give the images with --images, --voc, --coco or --manifest")
