"""The static model: parameters, ties and buckets read from the module tree, nothing run.

Works on CPU, CUDA and the meta device because it reads only shapes, dtypes
and storage identity, never values.
"""

from .buckets import BUCKETS, Buckets, bucket_resolver, find_buckets
from .inventory import Inventory, take_inventory
from .traits import ModelTraits, model_traits

__all__ = [
    "BUCKETS",
    "Buckets",
    "Inventory",
    "ModelTraits",
    "bucket_resolver",
    "find_buckets",
    "model_traits",
    "take_inventory",
]
