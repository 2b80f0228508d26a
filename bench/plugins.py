"""Model plugins: the installed entry points, then the modules named by --plugin."""
from __future__ import annotations


def load_models(plugins: list[str]) -> None:
    import models
    models.load_entry_points()
    for name in plugins:
        models.load_plugin(name)
