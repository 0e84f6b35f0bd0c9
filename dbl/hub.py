"""One way to load "a local path or a hub id": tokenizers, judge and featurizer LMs, the VAE.

A name that looks like a path (absolute, ``~``, ``./`` or ``../``) must exist; anything else is
passed to ``from_pretrained`` as a hub id (or a relative directory that exists). Both failures are
one line that names what could not be loaded and what to give instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dbl.errors import MissingDataError, UsageError

T = TypeVar("T")
OFFLINE_HINT = "give a local directory (see shared/tools/offline_assets.sh) or a reachable hub id"


def looks_like_a_path(name_or_path: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, home- or dot-relative."""
    return str(name_or_path).startswith(("/", "~", "./", "../"))


def resolve(name_or_path: str, what: str) -> str:
    """The local directory ``name_or_path`` names (expanded), or the hub id unchanged.

    ``what`` names the thing in the error, e.g. "tokenizer directory".
    """
    path = Path(name_or_path).expanduser()
    if looks_like_a_path(name_or_path) and not path.exists():
        raise MissingDataError(f"{what} {path} does not exist; {OFFLINE_HINT}")
    return str(path) if path.exists() else name_or_path


def from_pretrained(load: Callable[..., T], name_or_path: str, what: str, **kwargs) -> T:
    """``load(resolve(name_or_path), **kwargs)`` (a ``from_pretrained``), with a one-line error if it fails."""
    name_or_path = resolve(name_or_path, f"{what} directory")
    try:
        return load(name_or_path, **kwargs)
    except OSError as err:
        raise UsageError(f"cannot load {what} {name_or_path!r} ({str(err).splitlines()[0]}); {OFFLINE_HINT}") from None
