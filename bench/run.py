"""`python -m bench run`: validate the sweep, then run the missing cells with a live progress display."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.spec import SpecError, build_spec, cell_id, expand
from lawbench.reports.rows import eps_key


def _split_args(items: list[str]) -> tuple[str, list[str]]:
    preset, overrides = "default", []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            preset = item
        else:
            raise SpecError(f"argument '{item}' is neither the preset (it must come first) nor key=value")
    return preset, overrides


def check_inputs(cells: list[dict], data_dir: str | None, load: bool = True) -> None:
    """Unknown models, unknown datasets and unreadable data are bad input: caught before any cell runs.

    Loading the data here costs nothing extra: the runner's in-process cache hands the same split to the cells.
    """
    from lawbench import datasets
    from lawbench import models
    from bench.runner import load_data
    known_data = datasets.list_datasets()
    for cell in cells:
        if cell["dataset"] not in known_data:
            raise SpecError(f"key 'dataset': unknown dataset '{cell['dataset']}' (known: {', '.join(known_data)})")
        models.get_entry(cell["model"])  # ModelError names the model and close matches
    checked = set()
    for cell in cells if load else ():
        data = load_data(cell, data_dir)
        build = dict(in_shape=tuple(data.meta.in_shape), num_classes=data.meta.num_classes, width=cell["width"],
                     **cell["model_options"])
        key = (cell["model"], repr(sorted(build.items())), cell.get("entry", {}).get("sha256"))
        if key in checked:  # seeds and threats of one model share the check
            continue
        checked.add(key)
        # a model that cannot take this data's shape, or an option it does not know, is bad input too
        models.param_count(cell["model"], **build)
        if "entry" in cell:  # a checkpoint that does not fit its architecture is bad input, found before any run
            model = models.get_model(cell["model"], **build)
            models.load_checkpoint(model, cell["entry"]["checkpoint"], sha256=cell["entry"]["sha256"])


def resolve_widths(cells: list[dict], data_dir: str | None) -> None:
    """Cells with target_params get the width whose exact parameter count is closest to it (ties: the smaller
    width), found by bisection on the model's count (monotone in width for every width family)."""
    from lawbench import models
    from bench.runner import load_data
    for cell in cells:
        target = cell.get("target_params")
        if not target:
            continue
        meta = load_data(cell, data_dir).meta
        count = lambda w: models.param_count(cell["model"], in_shape=tuple(meta.in_shape),  # noqa: E731
                                             num_classes=meta.num_classes, width=w, **cell["model_options"])
        lo, hi = 1, 1
        while count(hi) < target:
            lo, hi = hi, hi * 2
            if hi > 1 << 24:
                raise SpecError(f"key 'target_params': {target:,} parameters need a {cell['model']} wider than "
                                f"{1 << 24:,}")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
        cell["width"] = min((lo, hi), key=lambda w: (abs(count(w) - target), w))


def read_entries(paths: list[str]) -> list:
    """The --entry files; the same file, or two files with one entry name, given twice is refused (their rows would
    be indistinguishable)."""
    from lawbench import models
    entries, seen_paths, seen_names = [], {}, {}
    for path in paths:
        real = str(Path(path).resolve())
        if real in seen_paths:
            also = "" if seen_paths[real] == path else f" (also as {seen_paths[real]})"
            raise SpecError(f"--entry {path}: given twice{also}; each entry is evaluated once")
        seen_paths[real] = path
        entry = models.read_checkpoint_entry(path)
        if entry.name in seen_names:
            raise SpecError(f"--entry {path}: entry name '{entry.name}' is also used by {seen_names[entry.name]}")
        seen_names[entry.name] = path
        entries.append(entry)
    return entries


def check_out_dir(out: str) -> None:
    """--out names a directory; '' would silently mean the current one."""
    if not out:
        raise SpecError("--out: empty path (name a results directory, e.g. --out results)")


def run_command(args, console: Console) -> int:
    from bench.plugins import load_models
    from bench.device import resolve_device
    preset, overrides = _split_args(args.args)
    spec = build_spec(preset, overrides)
    check_out_dir(args.out)
    resolve_device(args.device)  # an unknown or absent device is bad input, found before the store opens
    load_models(args.plugin)
    entries = read_entries(args.entry)
    cells = expand(spec, entries)
    resolve_widths(cells, args.data_dir)
    check_inputs(cells, args.data_dir, load=not args.dry_run)
    if args.dry_run:
        for cell in cells:
            console.print(f"{cell_id(cell)}  {cell['dataset']} n={cell['n_train'] or 'all'} {cell['model']} "
                          f"w={cell['width']} {cell['recipe']} seed={cell['seed']} {cell['threat']} {cell['eps']}")
        return 0
    return run_cells(cells, Path(args.out), console, device=args.device, data_dir=args.data_dir)


def cell_summary(row: dict) -> str:
    """One line per finished cell, so a run's log shows progress even where no live display renders."""
    from lawbench import reports
    e = reports.headline_eps(row)
    k = eps_key(e) if e is not None else None
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    sig = lambda v: "uncertified" if v is None else f"{v:.3g}"
    return (f"{row['model']} w={row['width']} {row['recipe']} seed={row['seed']} {row['threat']}: p={row['params']:,} "
            f"p/(n·d)={row['ratio']:.3g} clean {pct(row['clean_acc'])} robust@{e:g} {pct(row['robust_acc'].get(k))} "
            f"cert {pct(row['cert_acc'].get(k))} lip [{row['lip_lower']:.3g}, {sig(row['lip_upper'])}] "
            f"({row['timings'].get('total', 0):.1f} s)")


def check_out_folders(out_dir: Path) -> None:
    """The logs and checkpoints folders, where they exist, are folders: checked before the store opens."""
    from bench.store import StoreError
    for name, what in (("logs", "the cells' logs"), ("checkpoints", "the trained checkpoints")):
        folder = out_dir / name
        if folder.is_symlink() and not folder.exists() or folder.exists() and not folder.is_dir():
            raise StoreError(f"{folder}: not a directory ({what} go there)")


def prepare_out_dir(out_dir: Path) -> Path:
    """The logs folder, made before any cell runs; returns it."""
    from bench.store import StoreError
    log_dir = out_dir / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{log_dir}: cannot create the logs folder ({exc.strerror or type(exc).__name__})") from None
    return log_dir


def run_cells(cells: list[dict], out_dir: Path, console: Console, *, device="auto", data_dir=None) -> int:
    from lawbench import reports
    from bench.runner import run_cell
    from bench.store import Store
    check_out_folders(out_dir)
    with Store(out_dir) as store:
        done = store.finished()
        todo = [c for c in cells if cell_id(c) not in done]
        console.print(f"{len(cells)} cells: {len(cells) - len(todo)} already in {store.path}, {len(todo)} to run")
        log_dir = prepare_out_dir(out_dir)
        failed = 0
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[phase]}"))
        start = time.perf_counter()
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("cells", total=len(todo), phase="")
            for cell in todo:
                cid = cell_id(cell)
                label = f"{cell['model']} w={cell['width']} {cell['recipe']} seed={cell['seed']} {cell['threat']}"

                def phase(text, label=label):
                    progress.update(task, phase=f"{label}: {text}")

                with open(log_dir / f"{cid}.log", "a") as log_file:
                    def log(line, log_file=log_file, phase=phase):
                        # Attack logs go to the cell's log file whole; the display shows only the latest line.
                        log_file.write(line.rstrip("\n") + "\n")
                        phase(line.strip()[:60])

                    row = run_cell(cell, out_dir=out_dir, device_name=device, data_dir=data_dir,
                                   phase=phase, log=log)
                    if row.get("traceback"):
                        log_file.write(row["traceback"])
                store.append(row)
                if row["status"] != "ok":
                    failed += 1
                    progress.console.print(f"[red]cell {cid} ({label}) failed: {escape(str(row['error']))}")
                else:
                    progress.console.print(cell_summary(row))
                progress.advance(task)
            progress.update(task, phase="done")
        wanted = {cell_id(c) for c in cells}
        latest = {}
        for row in store.rows():
            if row.get("cell_id") in wanted:
                latest[row["cell_id"]] = row
        console.print(reports.console_table(list(latest.values()), title=f"results ({store.path})"))
        ok_rows = [r for r in latest.values() if r.get("status") == "ok"]
        if len({r["width"] for r in ok_rows}) >= 3:
            for line in reports.slope_summary(ok_rows):
                console.print(line)
        console.print(f"{len(todo)} cells run in {time.perf_counter() - start:.1f} s; "
                      f"{failed} failed; rows in {store.path}; `python -m bench report --out {out_dir}` for plots")
    return 1 if failed else 0
