"""The `coach` command: a table of subcommands, each owned by a package.

A subcommand is either a *leaf* module that defines `add_arguments(parser)` and `run(args) -> int`,
or a *group* module that defines `COMMANDS`, a list of `Command`s one level further down.
Only the module of the command being run is imported, so `coach edge ...` on a Jetson never
imports onnx, matplotlib or torch, and `coach --help` starts instantly.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from dataclasses import dataclass
from importlib import metadata

from coach_runtime import malloc
from coach_runtime.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # leaf: add_arguments + run; group: COMMANDS
    help: str
    extra: str = "all"  # the pip extra that provides the module's dependencies


COMMANDS = [
    Command("profile", "partitioner.profile_cli", "profile an ONNX model's nodes on this device", "plan"),
    Command("plan", "partitioner.plan_cli", "plan cuts and bit widths; write a plan bundle", "plan"),
    Command("edge", "edge.cli", "run the edge agent", "edge"),
    Command("cloud", "cloud.cli", "run the cloud service, make dev certificates", "cloud"),
    Command("gesfi", "models.cli", "GesFi CSI gesture workload: inspect, simulate, train, eval", "train"),
    Command("bench", "bench.cli", "benchmarks and the link emulator", "all"),
    Command("demo", "bench.demo", "the main job end to end on an embedded default (localhost)", "all"),
]


@functools.cache  # (a metadata lookup scans site-packages: ~0.5 ms, once per Describe before)
def version() -> str:
    try:
        return metadata.version("coach-runtime")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def _usage(prog: str, commands: list[Command]) -> str:
    width = max(len(c.name) for c in commands)
    lines = [f"usage: {prog} COMMAND [options]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.help}" for c in commands]
    lines += ["", f"Run '{prog} COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _load(cmd: Command, prog: str):
    try:
        return importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        ours = cmd.module.split(".")[0]
        if exc.name and exc.name.split(".")[0] not in (ours, "coach_runtime"):
            raise UserError(
                f"'{prog}' needs the Python package '{exc.name}': "
                f"pip install 'coach-runtime[{cmd.extra}]'"
            ) from None
        raise


def dispatch(prog: str, commands: list[Command], argv: list[str]) -> int:
    """Run `argv` against a table of commands (recursing into groups)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, commands))
        return 0 if argv else 2
    by_name = {c.name: c for c in commands}
    cmd = by_name.get(argv[0])
    if cmd is None:
        raise UserError(f"unknown command '{argv[0]}'; one of: {', '.join(by_name)}")
    sub_prog = f"{prog} {cmd.name}"
    module = _load(cmd, sub_prog)
    if hasattr(module, "COMMANDS"):
        return dispatch(sub_prog, module.COMMANDS, argv[1:])
    parser = argparse.ArgumentParser(prog=sub_prog, description=cmd.help)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.prog = sub_prog
    return int(module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"coach {version()}")
        return 0
    verbose = 0
    while argv and argv[0] in ("-v", "-vv", "--verbose"):
        verbose += 2 if argv.pop(0) == "-vv" else 1
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    malloc.tune()
    try:
        return dispatch("coach", COMMANDS, argv)
    except UserError as exc:
        print(f"coach: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("coach: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
