"""Results and rendering: the Report, its versioned JSON, the text tables, the estimates, the fit and the plot.

Everything here reads what was measured (a tracker's step records, turned
into the typed JSON shape of ``schema``) and never measures anything itself.
"""

from .report import ModelReport, Report
from .schema import SCHEMA

__all__ = ["SCHEMA", "ModelReport", "Report"]
