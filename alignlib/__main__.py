from .commands.cli import entry

raise SystemExit(entry())
