"""Hub references: a model is a local directory, a hub id, or a hub id pinned
to a revision written ``org/name@revision`` (a commit, branch or tag; the
config's ``revision:`` becomes this suffix). A hub id cannot contain ``@``,
so the suffix is unambiguous; an existing local path is never split."""
from __future__ import annotations

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

