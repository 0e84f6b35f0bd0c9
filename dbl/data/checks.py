"""Range checks of the options every DataModule shares (batch sizes, counts, workers), made in the
constructors so that a bad value is a one-line error before anything runs."""

from __future__ import annotations

from dbl.errors import UsageError


def check_loader_options(**options: int | None) -> None:
    """Each option (None allowed: "use the default") must be >= 1, ``num_workers`` >= 0."""
    for name, value in options.items():
        least = 0 if name == "num_workers" else 1
        if value is not None and value < least:
            raise UsageError(f"data {name} must be >= {least}, got {value}")
