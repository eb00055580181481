"""Running a user's script: find its models, measure their steps, and report, leaving the script as it was.

``runner`` runs the script or module as ``__main__``; ``watcher`` finds the
models it calls; ``session`` measures each and assembles the report;
``batch_sweep`` re-runs it at other batch sizes; ``options`` checks the command
line before anything runs; ``signals`` turns SIGTERM into a report.
"""
