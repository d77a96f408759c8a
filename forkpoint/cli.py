"""The ``forkpoint`` command: the demo, the benchmarks, and operator control of running programs.

The library never prints; this module is the one place that does.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("forkpoint.demo", "run a key-value server that survives segfaults, hangs and corruption"),
    "bench": ("forkpoint.bench", "compare checkpoint/restore with fork, pickle image files and CRIU"),
    "ls": ("forkpoint.operator", "list a running program's checkpoints and jump history"),
    "restore": ("forkpoint.operator", "restore a running program to one of its checkpoints"),
    "discard": ("forkpoint.operator", "discard one of a running program's checkpoints"),
    "status": ("forkpoint.operator", "show a running program's live process, uptime and recoveries"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (modname, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=modname)
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        module.add_arguments(p, name)
    args = parser.parse_args(argv)
    try:
        module = importlib.import_module(args._module)
    except ImportError:
        print(f"forkpoint: '{args.command}' is not available in this installation", file=sys.stderr)
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
