"""Section 3 of the paper ("A Framework for Program Recovery Using Checkpointing in UNIX"), in Python.

    void my_handler(int signum) { if (signum == SIGSEGV) tlongjmp(0); else tlongjmp(1); }
    main() { signal(SIGSEGV, my_handler); if (tsetjmp() < 0) perror("tsetjmp");
             printf("do you want to corrupt the program\\n");
             if (getchar() == 'y') /* perform an operation that causes segmentation fault */ }

Two ways to fault:

* ``--fault kill`` sends SIGSEGV with kill(): Python delivers it, so the paper's handler runs and
  calls ``tlongjmp(0)``, exactly as in the paper.
* ``--fault real`` dereferences NULL in C (``ctypes.string_at(0)``). A Python-level handler can never
  run for a real fault (the C trampoline returns, the instruction faults again, forever), so this
  mode leaves SIGSEGV at its default action and lets the shepherd restore the checkpoint when the
  process dies: ``forkpoint.recover_on(signal.SIGSEGV)``.

``--answer y`` answers the question without a terminal.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

import forkpoint


def my_handler(signum: int, frame: object) -> None:
    if signum == signal.SIGSEGV:
        forkpoint.tlongjmp(0)
    else:
        forkpoint.tlongjmp(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answer", choices=["y", "n"], help="answer the question without a terminal")
    parser.add_argument("--fault", choices=["kill", "real"], default="kill",
                        help="kill: SIGSEGV sent with kill(), handled in Python; real: a NULL dereference")
    args = parser.parse_args(argv)

    if args.fault == "kill":
        signal.signal(signal.SIGSEGV, my_handler)
    else:
        forkpoint.recover_on(signal.SIGSEGV)
    state = forkpoint.tsetjmp()      # raises instead of returning < 0 on failure

    if forkpoint.chkpt_status(forkpoint.CHKPT_RECOVERED):
        sig = forkpoint.chkpt_status(forkpoint.CKPT_SIGTYPE)
        print(f"recovered: back in state {forkpoint.chkpt_status(forkpoint.CKPT_TO_STATE)} from state "
              f"{forkpoint.chkpt_status(forkpoint.CKPT_FROM_STATE)} after {signal.Signals(sig).name}, "
              f"pid {os.getpid()}, program pid {forkpoint.shepherd_pid()}")
        return 0

    print(f"checkpoint {state} taken; do you want to corrupt the program", flush=True)
    answer = args.answer or sys.stdin.readline().strip()[:1]
    if answer == "y":
        print(f"corrupting the program ({args.fault} fault) in pid {os.getpid()}", flush=True)
        if args.fault == "kill":
            os.kill(os.getpid(), signal.SIGSEGV)
        else:
            ctypes.string_at(0)
    print("no corruption; exiting normally")
    return 0


if __name__ == "__main__":
    sys.exit(main())
