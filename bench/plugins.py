"""Model plugins: the installed entry points, then the modules named by --plugin."""
from __future__ import annotations

import sys


def load_models(plugins: list[str]) -> None:
    from lawbench import models
    models.load_entry_points(deprecated=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for name in plugins:
        models.load_plugin(name)
