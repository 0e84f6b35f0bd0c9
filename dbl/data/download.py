"""Downloading a dataset file from its canonical source, and writing caches atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from dbl.errors import MissingDataError


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder; renamed onto ``path`` (``os.replace``) when the
    ``with`` block ends without an error, removed (file or folder) when it raises or is interrupted.

    The name is unique (``.<name>.<random>.tmp<suffix>``), so concurrent writers never share a
    half-written file, and readers see either nothing or the finished one. Whatever checks the
    result belong inside the block: a check that fails leaves nothing behind.
    """
    path = Path(path)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent))
    tmp.rmdir()  # only the unique name is wanted; the caller writes a file or a folder there
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        for folder in made:  # and the folders made for it, if nothing else arrived in them
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def download(url: str, path: Path, check: Callable[[Path], None] | None = None) -> None:
    """Fetch ``url`` to ``path`` with a progress bar (on a terminal), atomically: the bytes go to a
    temporary file next to ``path``, renamed only when complete and checked, so an interrupted or
    corrupt download never looks finished and leaves nothing behind. ``check(tmp_path)`` raises
    when the file is unusable (e.g. not a zip). A failure raises ``MissingDataError`` saying where
    to put the file by hand."""
    path = Path(path)
    try:
        with atomic_path(path) as part, tqdm(desc=f"downloading {path.name}", unit="B", unit_scale=True,
                                              unit_divisor=1024, disable=None) as bar:

            def report(blocks: int, block_size: int, total: int) -> None:
                if total > 0:
                    bar.total = total
                bar.update(blocks * block_size - bar.n)

            urllib.request.urlretrieve(url, part, reporthook=report)  # ContentTooShortError when cut short
            if check is not None:
                check(part)
    except (OSError, ValueError, EOFError) as err:  # URLError is an OSError; check failures
        raise MissingDataError(f"downloading {url} failed ({err}); put {path.name} at {path} by hand") from None
