"""The ``forkpoint`` command: the demo, the benchmarks, and operator control of running programs.

The library never prints; this module is the one place that does (with ``demo`` and ``bench``, which
are its subcommands).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from . import bench, demo, operator


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _operator_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The arguments of operator subcommand ``name`` (ls, restore, discard or status)."""
    parser.add_argument("pid", type=_positive, metavar="PID",
                        help="the program's PID (the one its parent and the shell know)")
    if name in ("restore", "discard"):
        parser.add_argument("n", type=_positive, metavar="N", help="the checkpoint id (see 'forkpoint ls')")
    if name == "restore":
        parser.add_argument("--reason", default="", help="recorded in the program's jump history")
    if name in ("ls", "status"):
        parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for an answer")


def _safe(value: Any) -> str:
    """``value`` as text a terminal shows as it is: control and format characters (escape
    sequences, bidirectional overrides, line breaks) from the program are printed escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _print_ls(reply: dict[str, Any], out: Any) -> None:
    cks = reply["checkpoints"]
    print(f"forkpoint program {_safe(reply['pid'])}: live process {_safe(reply['live'] or '-')}, "
          f"current checkpoint {_safe(reply['current'])}, {len(cks)} checkpoint(s)", file=out)
    if cks:
        print(f"  {'ID':>4} {'PID':>8} {'AGE':>8} {'PINNED':>6} {'SPARES':>6} {'USS':>11} {'PSS':>11}",
              file=out)
        for c in cks:
            print(f"  {_safe(c['id']):>4} {_safe(c['pid']):>8} {_age(c['age']):>8} "
                  f"{'yes' if c['pinned'] else 'no':>6} {len(c.get('spares', [])):>6} {_size(c['uss']):>11} "
                  f"{_size(c['pss']):>11}", file=out)
    hist = reply["history"]
    print(f"history: {len(hist)} entr{'y' if len(hist) == 1 else 'ies'}", file=out)
    for h in hist:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"]))
        key = f"  input {_safe(repr(h['key']))}" if h.get("key") is not None else ""
        print(f"  #{_safe(h['seq']):<4} {when}  {_safe(h['from_state'])} -> {_safe(h['to_state'])}  "
              f"signal {_safe(h['signal'])}  {_safe(h['reason'])}{key}", file=out)


def _print_status(reply: dict[str, Any], out: Any) -> None:
    q = reply["quarantined"]
    print(f"forkpoint program {_safe(reply['pid'])}", file=out)
    print(f"  live process: {_safe(reply['live'] or '- (restoring)')}", file=out)
    print(f"  uptime:       {_age(reply['uptime'])}", file=out)
    print(f"  recoveries:   {_safe(reply['recoveries'])}", file=out)
    print(f"  checkpoints:  {_safe(reply['checkpoints'])} (current {_safe(reply['current'])})", file=out)
    print(f"  quarantined:  {_safe(', '.join(map(repr, q))) if q else 'none'}", file=out)


def _operator_run(args: argparse.Namespace) -> int:
    """Carry out one operator subcommand; returns the exit status (0 success, 1 failure)."""
    cmd, pid, out = args.command, args.pid, sys.stdout
    try:
        if cmd == "ls":
            reply = operator.request(pid, "ls", args.timeout)
            if args.json:
                json.dump({"checkpoints": reply["checkpoints"], "history": reply["history"]}, out)
                out.write("\n")
            else:
                _print_ls(reply, out)
        elif cmd == "status":
            reply = operator.request(pid, "status", args.timeout)
            if args.json:
                json.dump({k: v for k, v in reply.items() if k != "ok"}, out)
                out.write("\n")
            else:
                _print_status(reply, out)
        elif cmd == "restore":
            reply = operator.request(pid, "restore", args.timeout, n=args.n, reason=args.reason)
            print(f"program {pid} restored to checkpoint {_safe(reply['restored'])} (from state "
                  f"{_safe(reply['from_state'])}; live process {_safe(reply['live'] or 'starting')}): "
                  f"{_safe(reply['reason'])}", file=out)
        elif cmd == "discard":
            reply = operator.request(pid, "discard", args.timeout, n=args.n)
            left = ", ".join(map(str, reply["checkpoints"])) or "none"
            print(f"program {pid}: checkpoint {_safe(reply['discarded'])} discarded (left: {_safe(left)})",
                  file=out)
        else:
            print(f"forkpoint: unknown operator command {cmd!r}", file=sys.stderr)
            return 2
    except operator.OperatorError as e:
        print(f"forkpoint {cmd}: {_safe(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"forkpoint {cmd}: program {pid}: {_safe(e)}", file=sys.stderr)
        return 1
    return 0


_OPERATOR = {
    "ls": "list a running program's checkpoints and jump history",
    "restore": "restore a running program to one of its checkpoints",
    "discard": "discard one of a running program's checkpoints",
    "status": "show a running program's live process, uptime and recoveries",
}
# subcommand -> (help, add its arguments, run it)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser, str], None],
                          Callable[[argparse.Namespace], int]]] = {
    "demo": ("run a key-value server that survives segfaults, hangs and corruption",
             demo.add_arguments, demo.run),
    "bench": ("compare checkpoint/restore with fork, pickle image files and CRIU",
              bench.add_arguments, bench.run),
    **{name: (text, _operator_arguments, _operator_run) for name, text in _OPERATOR.items()},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkpoint", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=run)
        add_arguments(p, name)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
