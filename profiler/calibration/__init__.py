"""Real GPU measurements shipped with the package, for calibrating projections (see results/calibration.py)."""
