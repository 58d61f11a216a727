"""The `personaxis` command line: every command, and the options and helpers they share.

The commands only parse, call the library and print; `main` (in `personaxis.cli.main`) is the entry point.
"""
