"""The bottom layer: one helper per idea that every library may import (and that imports nothing of the project).

    files.atomic_output / atomic_write_bytes / atomic_write_text   never a half-written file
    names.did_you_mean                                              the close match an error line offers
    modes.eval_mode                                                 eval mode for a block, each module's own mode after
    memory.is_oom / memory.Backoff                                  a batch that halves on out-of-memory
    timing.Timer                                                    seconds per named phase

files, names, modes and timing import no torch (reports, which never imports torch, may use them).
"""
