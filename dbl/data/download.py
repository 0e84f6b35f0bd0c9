"""Downloading a dataset file from its canonical source."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from tqdm import tqdm

from dbl.errors import MissingDataError


def download(url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` with a progress bar (on a terminal), atomically: the bytes go to
    ``<path>.part``, renamed only when complete, so an interrupted download never looks finished.
    A failure raises ``MissingDataError`` saying where to put the file by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with tqdm(desc=f"downloading {path.name}", unit="B", unit_scale=True, unit_divisor=1024, disable=None) as bar:

            def report(blocks: int, block_size: int, total: int) -> None:
                if total > 0:
                    bar.total = total
                bar.update(blocks * block_size - bar.n)

            urllib.request.urlretrieve(url, part, reporthook=report)
    except OSError as err:
        part.unlink(missing_ok=True)
        raise MissingDataError(f"downloading {url} failed ({err}); put {path.name} at {path} by hand") from None
    part.replace(path)
