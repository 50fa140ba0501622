"""This repository's version, recorded in what it exports (a model folder's config.json says which code wrote it).

`VERSION` is bumped by hand when a release changes what the code produces; `git_commit()` adds the exact commit
when the code runs from a git checkout (with `-dirty` when tracked files differ from it), else None.
"""
from __future__ import annotations

import functools
import os
import subprocess

VERSION = "0.5.0"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (40 hex digits, '-dirty' appended when tracked files differ from it), or None outside
    a git checkout or without git. Read-only: no index lock is taken (others may be committing meanwhile)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None or commit.returncode != 0 or not commit.stdout.strip():
        return None
    diff = _git("diff", "--quiet", "HEAD", "--")
    return commit.stdout.strip() + ("-dirty" if diff is not None and diff.returncode == 1 else "")


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=_ROOT, capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None


def version_record() -> dict:
    """{'version': VERSION, 'git_commit': commit or None}: what an export records about the code that wrote it."""
    return {"version": VERSION, "git_commit": git_commit()}
