"""`coach edge ...`: the edge agent."""

from coach_runtime.cli import Command

COMMANDS = [
    Command("run", "edge.run_cli", "run a plan bundle's head here and stream cut tensors to the cloud", "edge"),
]
