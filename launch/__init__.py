"""Thin command-line entry points, each run as `python -m launch.NAME`."""
