"""The hint an error line gives for a misspelt name."""
from __future__ import annotations

import difflib


def did_you_mean(name, known, n: int = 1, cutoff: float = 0.6) -> str:
    """"; did you mean 'x'?" (or "'x', 'y'" with n > 1) for the known names closest to `name`, "" when none is."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
