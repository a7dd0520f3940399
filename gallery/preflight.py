"""What a run can know at start and checks before any work: a run that cannot finish stops in its first
step with every reason and fix, not hours later in the step that needs the missing piece.

Checked: the backbone's weights are on this machine (found, not loaded: `model.weights` names a file
the input layer can read, within GALLERY_MAX_MODEL_BYTES; "imagenet" is in the library's cache or
package), and the run-scoped store and the reports location take a write (a probe file, written and
deleted, in a folder or under an s3:// prefix).
"""
from __future__ import annotations

import uuid

import gallery.storage as storage
from gallery.config import Settings
from gallery.errors import UserError, excerpt
from gallery.model.backbones import WeightsUnavailable, weights_file


class NotReady(UserError):
    """Every problem that would stop the run later, each with its fix; raised before any work."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("the run cannot start (nothing was run):\n" + "\n".join(f"- {p}" for p in self.problems))


def preflight(settings: Settings, store_root: str, reports: str) -> None:
    """Raise NotReady listing every problem knowable before any work; return when there is none."""
    problems = [problem for problem in (weights_problem(settings),
                                        write_problem(store_root, "the store", "--store"),
                                        write_problem(reports, "the reports location", "--reports")) if problem]
    if problems:
        raise NotReady(problems)


def weights_problem(settings: Settings) -> str | None:
    """Why the backbone's weights (model.backbone, model.weights) cannot be used here, or None."""
    try:
        weights_file(settings.model.backbone, settings.model.weights)
    except WeightsUnavailable as e:
        return str(e)
    return None


def write_problem(location: str, what: str, option: str) -> str | None:
    """Why nothing can be written under `location` (a folder, created if missing, or an s3:// prefix), or
    None: a small probe file is written there and deleted."""
    probe = storage.join(location, f".gallery-write-probe-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"gallery checks it can write here; delete me if a run left me\n")
        storage.delete(probe)
    except (OSError, ValueError) as e:  # pyarrow's errors are OSError (I/O, access) or ValueError (a bad URI)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else excerpt(str(e), 200, quote=False)
        return (f"{what} {location} cannot be written ({reason}): give {option} a folder or s3:// prefix "
                "this user can write, or fix its permissions")
    return None
