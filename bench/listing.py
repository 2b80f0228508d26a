"""`python -m bench list`: models (family, inputs, parameter counts at default widths), datasets, presets, attacks."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Input shapes used to show parameter counts: the embedded default data and CIFAR-10.
SHOW_SHAPES = {"mnist5k": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


def list_command(args, console: Console) -> int:
    from lawbench import attacks
    from lawbench import datasets
    from lawbench import models
    from bench.plugins import load_models
    from bench.spec import list_presets
    load_models(args.plugin)
    table = Table(title="models")
    for col in ("name", "family", "inputs", "datasets", "params at default widths"):
        table.add_column(col)
    for entry in models.list_models():
        shown = [d for d in (getattr(entry, "datasets", None) or ("mnist5k",)) if d in SHOW_SHAPES] or ["mnist5k"]
        in_shape, classes = SHOW_SHAPES[shown[0]]
        counts = []
        for w in entry.default_widths:
            try:
                counts.append(f"{w}:{models.param_count(entry.name, in_shape=in_shape, num_classes=classes, width=w):,}")
            except Exception as exc:  # a plugin entry that cannot build on this shape
                counts.append(f"{w}:({type(exc).__name__})")
        table.add_row(entry.name, entry.family, str(entry.inputs), ", ".join(getattr(entry, "datasets", ()) or ()),
                      escape(f"[{shown[0]}] " + " ".join(counts)))
    console.print(table)
    attack_items = {a.name: escape(f"[{a.kind}; {', '.join(a.norms)}{'; AutoAttack grade' if a.verifies else ''}] "
                                   f"{a.description}") for a in attacks.list_attacks()}
    for title, items in (("datasets", datasets.list_datasets()), ("presets", list_presets()),
                         ("attacks", attack_items)):
        t = Table(title=title)
        t.add_column("name")
        t.add_column("description")
        for name, desc in items.items():
            t.add_row(name, desc)
        console.print(t)
    return 0
