"""The command line, ``python -m alignlib <command>``: argument building from the config dataclasses, the run
presets, the method runs, the tour, and each command's tail (parse, validate, run)."""
