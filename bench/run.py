"""`python -m bench run`: validate the sweep, then run the missing cells with a live progress display."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.spec import SpecError, build_spec, cell_id, executor_options, expand
from bench.store import check_out_dir
from lawbench.reports.schema import eps_key
from lawbench.reports.rows import one_per_cell


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


def run_command(args, console: Console) -> int:
    from bench.plugins import load_models
    from bench.device import resolve_device
    preset, overrides = _split_args(args.args)
    load_models(args.plugin)  # first: the spec may name the models and attacks its plugins register
    spec = build_spec(preset, overrides, executor_flags(args))
    check_out_dir(args.out)
    executor = executor_options(spec["executor"])  # a bad executor option is bad input, found before anything loads
    resolve_device(args.device)  # an unknown or absent device is bad input, found before the store opens
    entries = read_entries(args.entry)
    cells = expand(spec, entries)
    resolve_widths(cells, args.data_dir)
    check_inputs(cells, args.data_dir, load=not args.dry_run)
    if args.dry_run:
        for cell in cells:
            console.print(f"{cell_id(cell)}  {cell['dataset']} n={cell['n_train'] or 'all'} {cell['model']} "
                          f"w={cell['width']} {cell['recipe']} seed={cell['seed']} {cell['threat']} {cell['eps']}")
        return 0
    plugins = tuple(str(Path(p).resolve()) if p.endswith(".py") or "/" in p else p for p in args.plugin)
    return run_cells(cells, Path(args.out), console, device=args.device, data_dir=args.data_dir,
                     executor=executor, plugins=plugins)


def executor_flags(args) -> dict:
    """--executor, --threads, --workers and --address as [executor] options (build_spec lays them over the table)."""
    from bench.spec import parse_value
    return {option: value if option in ("name", "address") else parse_value(value)
            for option, value in (("name", args.executor), ("threads", args.threads), ("workers", args.workers),
                                  ("address", args.address)) if value is not None}


def cell_summary(row: dict) -> str:
    """One line per finished cell, so a run's log shows progress even where no live display renders."""
    from lawbench import reports
    e = reports.headline_eps(row)
    k = eps_key(e) if e is not None else None
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    sig = lambda v: "uncertified" if v is None else f"{v:.3g}"
    low = lambda v: "–" if v is None else f"{v:.3g}"  # a lower-bound phase that could not run
    return (f"{row['model']} w={row['width']} {row['recipe']} seed={row['seed']} {row['threat']}: p={row['params']:,} "
            f"p/(n·d)={row['ratio']:.3g} clean {pct(row['clean_acc'])} robust@{e:g} {pct(row['robust_acc'].get(k))} "
            f"cert {pct(row['cert_acc'].get(k))} lip [{low(row['lip_lower'])}, {sig(row['lip_upper'])}] "
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


class Plan:
    """The cells still to run, in order. A cell waits while an earlier cell of the plan trains weights it needs (the
    same checkpoint, or the ERM interpolator a smooth cell starts from): no two workers train one checkpoint."""

    def __init__(self, cells: list[dict]):
        from bench.runner import erm_cell
        from bench.spec import train_key
        self.waiting: list[tuple[dict, str | None]] = []
        owner: dict[str, str] = {}
        for cell in cells:
            cid = cell_id(cell)
            needs = [] if "entry" in cell else [train_key(cell)]
            if cell.get("recipe") == "smooth":
                needs.append(train_key(erm_cell(cell)))
            deps = {owner[k] for k in needs if k in owner}
            for k in needs:
                owner.setdefault(k, cid)
            self.waiting.append((cell, deps))
        self.running: set[str] = set()

    def ready(self, finished: set[str]) -> list[dict]:
        """The waiting cells whose dependencies have finished; they move to running."""
        out, rest = [], []
        for cell, deps in self.waiting:
            (out if deps <= finished else rest).append((cell, deps))
        self.waiting = rest
        self.running.update(cell_id(c) for c, _ in out)
        return [c for c, _ in out]

    @property
    def open(self) -> bool:
        return bool(self.waiting or self.running)


class Display:
    """The live view every executor shares: a bar over the sweep and one line per running cell, fed by events; the
    driver writes each cell's log file from its log events (or, for executors that do not stream, its Done)."""

    COLUMNS = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[phase]}"))

    def __init__(self, console: Console, cells: list[dict], log_dir: Path):
        self.progress = Progress(*self.COLUMNS, console=console, transient=False)
        self.log_dir = log_dir
        self.labels = {cell_id(c): f"{c['model']} w={c['width']} {c['recipe']} seed={c['seed']} {c['threat']}"
                       for c in cells}
        self.total = self.progress.add_task("cells", total=len(cells), phase="")
        self.lines: dict[str, int] = {}
        self.logs: dict = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        for fh in self.logs.values():
            fh.close()
        self.progress.update(self.total, phase="done")
        self.progress.__exit__(*exc)

    def _log(self, cid: str, line: str) -> None:
        if cid not in self.logs:
            self.logs[cid] = open(self.log_dir / f"{cid}.log", "a")
        self.logs[cid].write(line.rstrip("\n") + "\n")

    def on_event(self, event) -> None:
        cid = event.cell_id
        if cid not in self.lines:
            self.lines[cid] = self.progress.add_task(self.labels.get(cid, cid), total=None, phase="")
        if event.kind == "log":  # attack logs go to the cell's log file whole; the display shows the latest line
            self._log(cid, event.text)
        self.progress.update(self.lines[cid], phase=event.text.strip()[:60])

    def finished(self, done) -> None:
        row, cid = done.row, done.task.cell_id
        for line in done.log:
            self._log(cid, line)
        if row.get("traceback"):
            self._log(cid, row["traceback"])
        if cid in self.logs:
            self.logs.pop(cid).close()
        if cid in self.lines:
            self.progress.remove_task(self.lines.pop(cid))
        if row["status"] != "ok":
            self.progress.console.print(f"[red]cell {cid} ({self.labels.get(cid, cid)}) failed: "
                                        f"{escape(str(row['error']))}")
        else:
            self.progress.console.print(cell_summary(row))
        self.progress.advance(self.total)


def merge_cell_files(store) -> int:
    """Rows that per-cell files hold (SLURM tasks of this or an earlier run) go into the store once, by cell_id;
    each file is removed after its row is in. Returns how many rows were added."""
    from bench.store import cell_files, read_cell_file
    have = store.finished()
    added = 0
    for path in cell_files(store.dir):
        payload = read_cell_file(path)
        if payload is None:
            continue
        row = payload["row"]
        if row.get("status") == "ok" and row["cell_id"] not in have:
            store.append(row)
            have.add(row["cell_id"])
            added += 1
        path.unlink(missing_ok=True)
    return added


def drive(plan: Plan, executor, store, display: Display, make_task) -> int:
    """Submit what is ready, append each row as it arrives (the driver is the store's only writer), until the plan
    is done. Returns the number of failed cells."""
    failed = 0
    finished: set[str] = set()
    executor.submit([make_task(c) for c in plan.ready(finished)])
    while plan.open:
        for done in executor.poll(timeout=0.5):
            cid = done.task.cell_id
            store.append(done.row)
            if done.source is not None:
                done.source.unlink(missing_ok=True)
            display.finished(done)
            plan.running.discard(cid)
            finished.add(cid)
            failed += done.row["status"] != "ok"
        executor.submit([make_task(c) for c in plan.ready(finished)])
    return failed


def run_cells(cells: list[dict], out_dir: Path, console: Console, *, device="auto", data_dir=None,
              executor: dict | None = None, plugins: tuple = ()) -> int:
    """Plan -> executor -> driver: the cells not yet in the store run on the executor named by the validated
    [executor] table (default: local), and their rows are appended here as they arrive."""
    from lawbench import reports
    from bench.executors import make_executor
    from bench.runner import CellTask
    from bench.spec import executor_options
    from bench.store import Store
    options = executor if executor is not None else executor_options({})
    check_out_folders(out_dir)
    with Store(out_dir) as store:
        merged = merge_cell_files(store)
        done = store.finished()
        todo = [c for c in cells if cell_id(c) not in done]
        console.print(f"{len(cells)} cells: {len(cells) - len(todo)} already in {store.path}, {len(todo)} to run"
                      + (f" ({merged} merged from per-cell files)" if merged else ""))
        log_dir = prepare_out_dir(out_dir)
        start = time.perf_counter()
        failed = 0
        if todo:
            with Display(console, todo, log_dir) as display:
                ex = make_executor(options, display.on_event, out_dir)
                try:
                    display.progress.console.print(ex.describe())
                    budget = ex.budget()
                    # absolute paths: a worker may start in another directory (Ray, SLURM)
                    where = dict(out_dir=str(Path(out_dir).resolve()),
                                 data_dir=str(Path(data_dir).resolve()) if data_dir else None)
                    make_task = lambda c: CellTask(cell=c, device=device, budget=budget,  # noqa: E731
                                                   plugins=plugins, **where)
                    failed = drive(Plan(todo), ex, store, display, make_task)
                finally:
                    ex.close()
        wanted = {cell_id(c) for c in cells}
        latest, _ = one_per_cell([row for row in store.rows() if row["cell_id"] in wanted])
        console.print(reports.console_table(latest, title=f"results ({store.path})"))
        ok_rows = [r for r in latest if r.get("status") == "ok"]
        if len({r["width"] for r in ok_rows}) >= 3:
            for line in reports.slope_summary(ok_rows):
                console.print(line)
        console.print(f"{len(todo)} cells run in {time.perf_counter() - start:.1f} s; "
                      f"{failed} failed; rows in {store.path}; `python -m bench report --out {out_dir}` for plots")
    return 1 if failed else 0
