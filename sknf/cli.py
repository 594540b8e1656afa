"""`sknf` command line: one subcommand per module, imported only when chosen (start-up stays fast).

Each module named in COMMANDS provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sknf.config import ConfigError

COMMANDS = {
    "agent": ("sknf.agent", "run the node agent (DaemonSet entry point)"),
    "stats": ("sknf.stats", "per-pod traffic on this node"),
    "lab": ("sknf.lab", "a simulated multi-node cluster in network namespaces"),
    "install-cni": ("sknf.install", "install the CNI plugin and its conflist"),
    "cleanup": ("sknf.cleanup", "remove everything sknf made on this node"),
    "flows": ("sknf.flowlog", "flow events of this node's eBPF datapath: new flows and drops, resolved"),
    "doctor": ("sknf.doctor", "check this node for what breaks pod networking, and say how to fix it"),
    "sysdump": ("sknf.sysdump", "one tarball of this node's networking state for a bug report (no secrets)"),
    "bench": ("sknf.bench", "benchmarks (datapath, cni, scale)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sknf", description="sknf: a simple Kubernetes network fabric")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except ConfigError as e:  # every subcommand reads the agent's settings the same way
        print(f"sknf {args.command}: bad configuration: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sknf stats -o json | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is silent
        return 141  # as a shell reports SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
