"""profiler: where a PyTorch model's size and training memory go, measured.

Public API:
    analyze(model)            static inventory: parameters, bytes, ties, buckets
    profile(model)            context manager: measured memory of the training steps inside
    Report                    the result; ``render()``, ``to_dict()``, ``to_json(path)``
    ProfilerError             bad input, explained in one line
"""

from .analysis import analyze
from .errors import ProfilerError
from .profiling import profile
from .report import SCHEMA, Report

__all__ = ["analyze", "profile", "Report", "ProfilerError", "SCHEMA"]
__version__ = "0.1.0"
