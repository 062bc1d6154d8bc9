"""The save-root layout of training checkpoints, shared by the trainer (resume, rotation) and the converter
(export from a save root)::

    root/iter_0000200/     a complete checkpoint (megatron dist-ckpt files + config.yaml)
    root/iter_0000300/
    root/latest            "300", written last (atomically) once iter_0000300 is complete

Which checkpoint a run resumes from, or a tool reads, is decided here only.
"""

from __future__ import annotations

import logging
import os
import re

from .checks import CorruptCheckpoint, verify_dcp_checkpoint

__all__ = ["LATEST", "iter_dirname", "is_iter_dirname", "list_checkpoints", "find_latest", "pick_checkpoint", "resolve_checkpoint"]

log = logging.getLogger(__name__)

LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_iter_dirname(name: str) -> bool:
    """``name`` is a checkpoint directory name (``iter_`` and 7+ digits)."""
    return _ITER_RE.match(name) is not None


def _is_complete(path: str) -> bool:
    # dist_checkpointing writes metadata.json last; we rename only after it, so this is belt and braces.
    return os.path.isfile(os.path.join(path, "metadata.json"))


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as (iteration, path), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and _is_complete(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def find_latest(root: str | None) -> tuple[int, str] | None:
    """Newest complete checkpoint: the highest complete ``iter_*``. A save is renamed into place only once
    complete, so that is always the newest state; ``latest`` can lag it by a crash between the rename and
    the marker's update, and is then ignored (with a warning), never trusted over what is on disk."""
    if not root or not os.path.isdir(root):
        return None
    found = list_checkpoints(root)
    if not found:
        return None
    marker = os.path.join(root, LATEST)
    if os.path.isfile(marker):
        with open(marker) as f:
            text = f.read().strip()
        if text != str(found[-1][0]):
            log.warning("%s says %r but the newest complete checkpoint is %s; using it", marker, text, found[-1][1])
    return found[-1]


def pick_checkpoint(root: str) -> tuple[int, str] | None:
    """The newest complete checkpoint under ``root`` whose files are intact (sizes against ``.metadata``,
    metadata and ``common.pt`` readable through the allow-lists). A damaged one is skipped with a warning
    naming the file; :class:`CorruptCheckpoint` when every one is damaged. :class:`UnsafeCheckpoint` (a
    planted payload) is never skipped: it is raised."""
    found = list_checkpoints(root)
    damaged: list[str] = []
    for it, path in reversed(found):
        try:
            verify_dcp_checkpoint(path)
        except (CorruptCheckpoint, FileNotFoundError) as e:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous complete checkpoint", path, e)
            damaged.append(str(e))
            continue
        if damaged:
            log.warning("resuming from %s instead of the newer damaged checkpoint(s)", path)
        return it, path
    if damaged:
        raise CorruptCheckpoint(root, "every checkpoint is damaged: " + "; ".join(damaged))
    return None


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is one checkpoint, else the newest intact checkpoint of the save root
    ``path`` (:func:`pick_checkpoint`)."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    found = pick_checkpoint(path) if os.path.isdir(path) else None
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a directory holding complete checkpoints")
    return found[1]
