"""``fmsaccel bench``: expand a scenarios matrix (matrix.py), run its cells (runner.py), report (report.py).

The Typer sub-app is ``fmsaccel_cli.bench.cli.bench_app``; this package imports nothing heavy.
"""
