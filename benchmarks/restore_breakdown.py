#!/usr/bin/env python3
"""Where a restore's time goes, step by step, and the shepherd's part of it on its own.

    PYTHONPATH=. python benchmarks/restore_breakdown.py [--mb 10] [--restores 20] [--run-ms 50]
    PYTHONPATH=. python benchmarks/restore_breakdown.py --callgrind      # instructions, repeatable

Nothing in forkpoint is instrumented: a restore is observed from outside.

* With ``perf`` (the default), a program restores ``--restores`` times, running ``--run-ms`` of busy
  work between faults, under ``perf record`` of the system calls and scheduler events that mark
  each step: the live process sends ``Restore`` (sendto), the shepherd wakes (epoll_wait returns),
  reads it (recvmsg), kills the caller (kill), sends ``Wake`` (sendto), the spare returns from its
  recvmsg and sends ``Up`` (sendto). Medians of the gaps, in microseconds; perf itself adds a few
  microseconds per event.
* With ``--callgrind``, the same program runs under valgrind twice, with 1 and with 1 + N restores;
  the difference of the shepherd's instruction counts divided by N is what the shepherd executes per
  restore (the request, the decision, the kill, the wake, and the Spare, Up and SIGCHLD that follow).
  Instruction counts do not depend on the machine's load, so they decide changes on a noisy machine.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent("""
    import sys, time
    import forkpoint as fp
    mb, restores, run = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1e3
    heap = bytearray(b"\\xa5") * (mb << 20)
    fp.configure(max_checkpoints=8)
    fp.start()
    step = fp.persist_int("step")
    n = fp.tsetjmp()
    if not fp.chkpt_status(fp.CHKPT_RECOVERED):
        time.sleep(0.2 + mb / 1000)            # the first spare is ready and warm
    if step.add() <= restores:
        end = time.perf_counter() + run
        while time.perf_counter() < end:
            pass
        fp.tlongjmp(n)
""")

EVENTS = ["sched:sched_switch", "sched:sched_wakeup", "syscalls:sys_enter_sendto",
          "syscalls:sys_exit_recvmsg", "syscalls:sys_enter_kill", "syscalls:sys_enter_epoll_wait",
          "syscalls:sys_exit_epoll_wait"]
STEPS = [("request -> shepherd runs", "send", "shep_up"),
         ("shepherd: wake-up -> Restore read", "shep_up", "read"),
         ("shepherd: Restore read -> kill", "read", "kill"),
         ("shepherd: kill -> Wake sent", "kill", "wake"),
         ("shepherd's part (running -> Wake sent)", "shep_up", "wake"),
         ("Wake sent -> spare returns from recvmsg", "wake", "spare"),
         ("spare: Wake read -> Up sent (resume)", "spare", "up"),
         ("request -> Up sent", "send", "up")]
Event = tuple[float, str, int, int, str, str]      # us, comm, pid, cpu, event, details


def _events(data: str) -> list[Event]:
    out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,cpu,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    ev = []
    for line in out.splitlines():
        m = re.match(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)", line)
        if m:
            comm, pid, cpu, t, name, rest = m.groups()
            ev.append((float(t) * 1e6, comm, int(pid), int(cpu), name.rsplit(":", 1)[-1], rest))
    return ev


def _length(e: Event) -> int:
    m = re.search(r"len: 0x([0-9a-f]+)", e[5])
    return int(m.group(1), 16) if m else -1


def _find(ev: list[Event], start: int, forward: bool, name: str, pid: int | None = None,
          not_pids: tuple[int, ...] = (), min_len: int = 0, returns: str | None = None) -> int | None:
    idx = range(start, len(ev)) if forward else range(start, -1, -1)
    for i in idx:
        e = ev[i]
        if e[4] != name or (pid is not None and e[2] != pid) or e[2] in not_pids:
            continue
        if (min_len and _length(e) < min_len) or (returns is not None and e[5].strip() != returns):
            continue
        return i
    return None


def _restores(ev: list[Event]) -> list[dict[str, float]]:
    """One timeline per restore, keyed by the shepherd's SIGKILL of the caller."""
    shep = next((p for _, c, p, *_ in ev if c == "fp-shepherd"), None)
    rows: list[dict[str, float]] = []
    if shep is None:
        return rows
    for k, e in enumerate(ev):
        m = re.search(r"pid: 0x([0-9a-f]+), sig: 0x00000009", e[5])
        if not (e[2] == shep and e[4] == "sys_enter_kill" and m):
            continue
        killed = int(m.group(1), 16)
        send = _find(ev, k, False, "sys_enter_sendto", pid=killed)
        read = _find(ev, k, False, "sys_exit_recvmsg", pid=shep)
        if send is None or read is None or read < send:
            continue
        up_at = _find(ev, read, False, "sys_exit_epoll_wait", pid=shep)
        wake = _find(ev, k, True, "sys_enter_sendto", pid=shep, min_len=0x40)
        if up_at is None or up_at < send or wake is None:
            continue
        spare = _find(ev, wake, True, "sys_exit_recvmsg", not_pids=(shep, killed),
                      returns=hex(_length(ev[wake])))
        if spare is None:
            continue
        up = _find(ev, spare, True, "sys_enter_sendto", pid=ev[spare][2])
        if up is None:
            continue
        marks = {"send": send, "shep_up": up_at, "read": read, "kill": k, "wake": wake, "spare": spare,
                 "up": up}
        row = {name: ev[marks[b]][0] - ev[marks[a]][0] for name, a, b in STEPS}
        row["same_cpu"] = float(ev[spare][3] == ev[wake][3])
        rows.append(row)
    return rows


def perf_breakdown(args: argparse.Namespace) -> int:
    if shutil.which("perf") is None:
        print("perf is not installed: no breakdown (try --callgrind)", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        cmd = ["perf", "record", "-q", "-a", "-o", data, "-e", ",".join(EVENTS), "--", sys.executable, "-c",
               PROGRAM, str(args.mb), str(args.restores), str(args.run_ms)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"perf record failed ({r.stderr.strip()[-300:]}); no breakdown", file=sys.stderr)
            return 1
        rows = _restores(_events(data))
    if not rows:
        print("no restore found in the trace", file=sys.stderr)
        return 1
    print(f"One restore, step by step ({args.mb} MB heap, the program runs {args.run_ms:g} ms between "
          f"faults; us, median (min-max) of {len(rows)}; perf adds a few us per event):\n")
    print("| step | us |")
    print("|---|---|")
    for name, _, _ in STEPS:
        xs = [r[name] for r in rows]
        print(f"| {name} | {statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f}) |")
    same = sum(r["same_cpu"] for r in rows)
    print(f"\nThe spare ran on the shepherd's CPU in {same:.0f} of {len(rows)} restores.")
    return 0


CALLGRIND_PROGRAM = PROGRAM + textwrap.dedent("""
    time.sleep(3)                     # the last copy is made and warm (valgrind is slow)
    print("ready", flush=True)
    sys.stdin.readline()              # the driver has dumped the shepherd's counters
""")


def _shepherd_ir(restores: int, tmp: str) -> int:
    """The shepherd's instructions up to a quiet moment after the restores (dumped from outside,
    before the program ends: the end itself polls for its children, a time-dependent count)."""
    out = os.path.join(tmp, f"n{restores}")
    os.makedirs(out)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--trace-children=yes",
                             f"--callgrind-out-file={out}/cg.%p.out", sys.executable, "-c", CALLGRIND_PROGRAM,
                             "1", str(restores), "0"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the program did not get through its restores under valgrind")
        r = subprocess.run(["callgrind_control", "--dump=restores", str(proc.pid)], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"callgrind_control failed: {r.stderr.strip()}")
        proc.stdin.close()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for f in glob.glob(f"{out}/cg.{proc.pid}.out.*"):       # the shepherd keeps the program's pid
        m = re.search(r"^summary:\s+(\d+)", Path(f).read_text(errors="replace"), re.M)
        if m:
            return int(m.group(1))
    raise RuntimeError("no callgrind dump for the shepherd")


def callgrind_breakdown(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        base = _shepherd_ir(1, tmp)
        more = _shepherd_ir(1 + args.restores, tmp)
    per = (more - base) / args.restores
    print(f"The shepherd executes {per:,.0f} instructions per restore (callgrind: {more:,} with "
          f"{1 + args.restores} restores, {base:,} with 1; a 1 MB program restoring in a tight loop).")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=10, help="heap size (MB)")
    ap.add_argument("--restores", type=int, default=20)
    ap.add_argument("--run-ms", type=float, default=50.0, help="busy work between faults (ms)")
    ap.add_argument("--callgrind", action="store_true", help="count the shepherd's instructions instead")
    args = ap.parse_args()
    return callgrind_breakdown(args) if args.callgrind else perf_breakdown(args)


if __name__ == "__main__":
    sys.exit(main())
