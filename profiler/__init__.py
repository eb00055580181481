"""profiler: where a PyTorch model's size and training memory go, measured.

Public API:
    analyze(model)            static inventory: parameters, bytes, ties, buckets
    profile(model)            context manager: measured memory of the training steps inside
    fake_tensors()            context manager: tensors made inside have no memory (plan a model
                              larger than this machine: build it and profile its step inside)
    Report                    the result; ``render()``, ``to_dict()``, ``to_json(path)``, ``plot(path)``
    ProfilerError             bad input, explained in one line
    SCHEMA                    the version of the JSON report

The package, by job: ``script`` runs a user's script (``python -m profiler``),
``model`` counts a module statically, ``tracking`` measures its training
steps, ``results`` turns measurements into the report, its JSON, text and plot.
"""

from .api import analyze, fake_tensors, profile
from .errors import ProfilerError
from .results import SCHEMA, Report

__all__ = ["analyze", "profile", "fake_tensors", "Report", "ProfilerError", "SCHEMA"]
__version__ = "0.1.0"
