"""Wall time and CPU time (user + system) of a command and of every process it starts, however deep.

    .venv/bin/python benchmarks/cpu_tree.py LABEL COMMAND [ARGS...]

``/usr/bin/time`` counts a command's children only once they are reaped by it: the reading workers of
``screen`` and ``predict`` are children of multiprocessing's fork server, which the command never waits
for, so their CPU is missing (a ``screen --workers 2`` of 3,000 maps: 17 s of CPU by ``/usr/bin/time``,
36 s in all). This wrapper makes itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): orphaned
descendants become its children, it waits for every one of them, and ``RUSAGE_CHILDREN`` then holds the
whole tree. One line goes to stderr: ``LABEL: rc R wall W s, CPU U user + S sys = T s, max RSS M MB``
(max RSS: the largest single process). Linux only.
"""
from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import time

#: prctl option that makes orphaned descendants children of the caller (linux/prctl.h).
PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    label, command = argv[0], argv[1:]
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    start = time.perf_counter()
    rc = subprocess.Popen(command).wait()
    while True:                           # the orphans handed to this process (the fork server's workers)
        try:
            os.wait()
        except ChildProcessError:
            break
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = usage.ru_utime, usage.ru_stime
    print(f"{label}: rc {rc} wall {wall:.1f} s, CPU {user:.1f} user + {system:.1f} sys = "
          f"{user + system:.1f} s, max RSS {usage.ru_maxrss / 1024:.0f} MB", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
