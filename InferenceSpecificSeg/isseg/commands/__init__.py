"""The `isseg` commands: one module per command, each with `register(subparsers)` that adds its parser
and sets its handler `run(args) -> exit code`. They parse arguments, resolve what the user named
(device, model) and call the engine; `isseg.cli` assembles them into one program."""

from . import demo, devices, evaluate, package, phantom, refine, train

COMMANDS = (refine, train, package, demo, evaluate, devices, phantom)
