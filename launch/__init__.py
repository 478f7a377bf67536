"""Thin command-line entry points, each run as `python -m launch.NAME` or, installed, as
`dualseg-NAME` (launch/cli.py)."""
