"""Work a report hands to a second CPU: a function run in a forked process whose result comes back pickled.

A report of a cluster sweep's store (20,000 rows, 100 MB) is pure Python: parsing the store's parts on several CPUs is
the one lever left once each step is lean (0.7 s of parsing per 10 MB here; a part comes back pickled in a tenth of
that), and so is encoding the plots (PNG, SVG) beside the tables once they are drawn. A forked process must not read
the rows: touching their reference counts copies the pages that hold them (190 MB more at 20,000 rows), where a
part's reader holds only its part and the plots' encoder only the figures. Where
fork is missing (or ``processes`` is 1) the function simply runs here; should the forked process fail (an exception,
memory, a signal), ``result`` runs the function here, so a caller sees exactly what one process would have given, its
exceptions included.
"""
from __future__ import annotations

import gc
import os
import pickle
import warnings

CAN_FORK = hasattr(os, "fork")


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Forked:
    """``fn(*args)`` started in a forked process (when ``fork`` is true and possible); ``result()`` its value. Where
    it cannot run or fails there, ``result()`` runs ``here(*args)`` in this process (default: ``fn``)."""

    def __init__(self, fn, *args, fork: bool = True, here=None):
        self.fn, self.args, self.pid, self.here = fn, args, None, here or fn
        if not (fork and CAN_FORK):
            return
        r, w = os.pipe()
        with warnings.catch_warnings():  # Python 3.12+ warns of fork beside native threads (numpy's): none is used
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                gc.freeze()  # what it inherits is never scanned by its collector: scanning writes, copying pages
                os.close(r)
                with os.fdopen(w, "wb") as fh:
                    pickle.dump(fn(*args), fh, protocol=pickle.HIGHEST_PROTOCOL)
                code = 0
            finally:
                os._exit(code)  # never the parent's cleanup, exit handlers or buffered output
        os.close(w)
        self.fd = r

    def result(self):
        if self.pid is None:
            return self.here(*self.args)
        try:
            with os.fdopen(self.fd, "rb") as fh:
                value, ok = pickle.load(fh), True
        except (EOFError, pickle.UnpicklingError, OSError):
            value, ok = None, False
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        return value if ok and status == 0 else self.here(*self.args)
