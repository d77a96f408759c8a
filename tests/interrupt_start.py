"""An interrupt at the k-th point of forkpoint's start (where the process becomes the shepherd and
the program goes on in a fork), then the program goes on: run by tests/test_interrupt_sweep.py.

``python interrupt_start.py K`` (0: no interrupt) prints how many points the start passed, whether
it was interrupted and where, the signal mask's change, the descriptors open once forkpoint is
started, and whether a checkpoint then restores.
"""
from __future__ import annotations

import os
import sys

from interrupt_tracer import Interrupter, blocked_mask

import forkpoint as fp

k = int(sys.argv[1])
mask0 = blocked_mask()
tracer = Interrupter(k, skip=__file__)
interrupted = False
try:
    with tracer:
        fp.start()
except KeyboardInterrupt:
    interrupted = True
mask_kept = blocked_mask() == mask0
hits = fp.persist_int("hits")
n = fp.tsetjmp()                      # starts forkpoint if the interrupted start did not
if hits.value == 0:
    hits.add()
    fp.tlongjmp(n)
fds = len(os.listdir("/proc/self/fd")) - 1          # (the listing's own)
print(f"points {tracer.seen} interrupted {interrupted} at {tracer.where or '-'}: mask kept {mask_kept}, "
      f"fds {fds}, restored {fp.chkpt_status(fp.CHKPT_RECOVERED)}", flush=True)
