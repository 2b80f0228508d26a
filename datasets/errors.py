"""The datasets' one error type, and how its messages tell a user where to point at the data."""
from __future__ import annotations


HOW_TO_POINT = "point at the data with --data-dir DIR or the BENCH_DATA environment variable"


class DatasetError(ValueError):
    """A dataset could not be loaded. The message is one line naming the file, key or value at fault."""
