"""The ``forkpoint`` command: the demo, the benchmarks, and operator control of running programs.

The library never prints; this module is the one place that does (with ``demo`` and ``bench``, which
are its subcommands).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from . import _qadmin, bench, demo, operator
from ._errors import ForkpointError


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


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "never"


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}" if n else "no signal"


def _quarantine_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("action", choices=("list", "release"), help="list the quarantine, or release KEY")
    parser.add_argument("key", nargs="?", metavar="KEY",
                        help="release: the key's text, or the digest that 'list' shows")
    parser.add_argument("--pid", type=_positive, help="ask this running program (works at every scope)")
    parser.add_argument("--scope", help="process, host or redis://HOST:PORT/DB "
                                        "(default: $FORKPOINT_QUARANTINE)")
    parser.add_argument("--service", help="the service (default: $FORKPOINT_SERVICE; without it, every "
                                          "service of the store)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for a program")


def _print_quarantine(rep: dict[str, Any], out: Any) -> None:
    src = rep.get("pid")
    head = f"service {_safe(repr(rep.get('service')))} ({_safe(rep.get('scope'))}"
    head += f", as program {src} on {_safe(rep.get('host'))} sees it)" if src else ")"
    print(head, file=out)
    print(f"  store: {_safe(rep.get('store'))}" + ("" if rep.get("available", True) else
                                                   f"  UNAVAILABLE: {_safe(rep.get('error'))}"), file=out)
    if rep.get("error") and rep.get("available", True):
        print(f"  note: {_safe(rep['error'])}", file=out)
    q = rep.get("quarantined", [])
    failures = rep.get("failures", [])
    print(f"  quarantined: {len(q) or 'none'}", file=out)
    for e in q:
        key = repr(e["key"]) if e.get("key") is not None else "(hashed key)"
        print(f"    {_safe(key)}  digest {e['digest']}  since {_when(e['since'])}  "
              f"expires {_when(e['expires'])}  failures {e['failures']}  [{e['where']}]", file=out)
        for f in failures:
            if f["digest"] == e["digest"]:
                print(f"      failed {_when(f['time'])} on host {_safe(f['host'])} worker {f['pid']}: "
                      f"{_signame(f['signal'])}, {_safe(f['reason'])}", file=out)
    shown = {e["digest"] for e in q}
    rest = [f for f in failures if f["digest"] not in shown]
    if rest:
        print(f"  other failures ({len(rest)}):", file=out)
        for f in rest:
            key = repr(f["key"]) if f.get("key") is not None else f["digest"]
            print(f"    {_when(f['time'])} {_safe(key)} on host {_safe(f['host'])} worker {f['pid']}: "
                  f"{_signame(f['signal'])}, {_safe(f['reason'])}", file=out)
    rel = rep.get("releases", [])
    if rel:
        print(f"  released ({len(rel)}):", file=out)
        for r in rel:
            key = repr(r["key"]) if r.get("key") is not None else r["digest"]
            print(f"    {_when(r['time'])} {_safe(key)} by {_safe(r['by'])}", file=out)


def _quarantine_run(args: argparse.Namespace) -> int:
    out = sys.stdout
    scope = args.scope or os.environ.get("FORKPOINT_QUARANTINE") or "process"
    service = args.service or os.environ.get("FORKPOINT_SERVICE") or None
    if args.action == "release" and not args.key:
        print("forkpoint quarantine release: KEY is required", file=sys.stderr)
        return 2
    try:
        if args.pid is None and scope == "process":
            print("forkpoint quarantine: at process scope each program keeps its own quarantine: "
                  "pass --pid PID (or --scope host / --scope redis://HOST:PORT/DB)", file=sys.stderr)
            return 2
        if args.action == "list":
            if args.pid is not None:
                reports = _qadmin.program_report(args.pid, args.timeout)
            elif scope == "host":
                reports = _qadmin.host_report(service)
            else:
                reports = _qadmin.redis_report(scope, service)
            if args.json:
                json.dump(reports, out)
                out.write("\n")
            else:
                if not reports:
                    print(f"no quarantine store found ({_safe(scope)})", file=out)
                for rep in reports:
                    _print_quarantine(rep, out)
            return 0
        if args.pid is not None:
            done = _qadmin.program_release(args.pid, args.key, args.timeout)
        elif scope == "host":
            done = _qadmin.host_release(args.key, service)
        else:
            done = _qadmin.redis_release(scope, args.key, service)
        for where, released in done:
            what = "released" if released else "was not quarantined"
            print(f"{_safe(where)}: {_safe(args.key)!r} {what}", file=out)
        return 0 if any(r for _, r in done) else 1
    except operator.OperatorError as e:
        print(f"forkpoint quarantine: {e}", file=sys.stderr)
        return 1
    except (ForkpointError, OSError) as e:
        print(f"forkpoint quarantine: {_safe(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a store that answers garbage: say so, do not trace back
        print(f"forkpoint quarantine: {type(e).__name__}: {_safe(e)}", file=sys.stderr)
        return 1


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
    "quarantine": ("list or release quarantined inputs (a program's, this host's, or a Redis store's)",
                   _quarantine_arguments, _quarantine_run),
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
