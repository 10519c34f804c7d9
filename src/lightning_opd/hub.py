"""Hub references: a model is a local directory, a hub id, or a hub id pinned
to a revision written ``org/name@revision`` (a commit, branch or tag; the
config's ``revision:`` becomes this suffix). A hub id cannot contain ``@``,
so the suffix is unambiguous; an existing local path is never split."""
from __future__ import annotations

import re
from pathlib import Path


def split_revision(name_or_path: str | Path) -> tuple[str, str | None]:
    """(hub id or path, revision or None)."""
    text = str(name_or_path)
    if Path(text).exists() or "@" not in text:
        return text, None
    repo, revision = text.rsplit("@", 1)
    if not repo or not revision:
        raise ValueError(f"{text!r}: expected a hub id with a revision, org/name@revision")
    return repo, revision


class ModelLoadError(OSError):
    """A model or tokenizer cannot be found or read."""


# what a hub id looks like: "name" or "org/name"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_local(text: str) -> bool:
    """Whether ``text`` names a local path rather than a hub id: it starts
    with ``/``, ``./``, ``../`` or ``~``, cannot be a hub id, or its first
    part is an existing directory (``models/teacher-Z`` beside a ``models/``)."""
    path = Path(text).expanduser()
    if text.startswith(("./", "../", "~")) or path.is_absolute() or not _HUB_ID.match(text):
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def local_source(name_or_path: str | Path) -> dict:
    """``from_pretrained`` options for a model: a local directory is read
    offline (no hub call); a string that looks like a path but does not exist
    is refused at once rather than tried as a hub id (~50 s of retries)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return {"local_files_only": True}
    text = str(name_or_path)
    if path.exists() or looks_local(text):
        raise ModelLoadError(f"{text}: no such model directory (a local path must be a Hugging Face model "
                             "directory): point the model's `path:` in the config at one, or build the model "
                             "there first")
    return {}
