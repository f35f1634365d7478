"""Telling a mistyped local folder from a Hub repo id before anything asks the Hub.

`transformers` treats every name that is not an existing folder as a Hub repo id. A mistyped local path such as
`outputs/demo-segformer-b0` (the folder is `outputs/demo-segformer-b0-offset`) is a valid repo id, so without a
network the user waits for connection timeouts and reads, many lines later, that huggingface.co could not be
reached. A name is taken as local when no Hub id could have that shape (`./x`, `../x`, `/x`, `~/x`, `x/`, a
backslash, three or more components) or when its first component is a folder here (`outputs/...` after a training
run); only a Hub org named like a folder in the working directory is misread (run from another folder then).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path


def looks_local(name: str) -> bool:
    """Whether `name` can only be meant as a path on this machine (see the module docstring)."""
    text = str(name)
    if not text or os.path.isabs(text) or "\\" in text or text.startswith(("./", "../", "~")) or text.endswith("/"):
        return True
    parts = text.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def missing_folder_message(name: str, what: str = "model") -> str | None:
    """One line saying that `name` looks like a local folder that does not exist (with the closest existing names
    next to it), or None when it exists or may be a Hub repo id."""
    if not looks_local(name) or os.path.isdir(os.path.expanduser(str(name))):
        return None
    path = Path(os.path.expanduser(str(name)).rstrip("/\\"))
    if path.exists():
        return f"{what} {name!r} is a file, not a folder."
    parent = path.parent
    siblings = sorted(entry.name for entry in parent.iterdir() if entry.is_dir()) if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(str(parent / match) for match in close)}?" if close else ""
    where = "" if parent.is_dir() else f" ({parent} does not exist either)"
    return f"{what} {name!r}: no such folder{where}.{hint}"


def check_local_folder(name: str, what: str = "model") -> None:
    """Raise `FileNotFoundError` with `missing_folder_message` when `name` is a local folder that does not exist."""
    message = missing_folder_message(name, what)
    if message is not None:
        raise FileNotFoundError(message)


__all__ = ["check_local_folder", "looks_local", "missing_folder_message"]
