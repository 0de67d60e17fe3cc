"""The teacher-output cache: top-k soft targets in Parquet, features in Zarr, a manifest.

`writer.label` builds it (resumably), `reader.Cache` serves it to students, `verify`
checks it byte for byte; all three find its files through `layout`. The columns are
documented in the README.
"""

from kd.cache.layout import lse_column
from kd.cache.manifest import SCHEMA_VERSION, read_manifest
from kd.cache.reader import Cache, SoftTargets
from kd.cache.writer import Teacher, label, soft_targets

__all__ = ["SCHEMA_VERSION", "Cache", "SoftTargets", "Teacher", "label", "lse_column", "read_manifest",
           "soft_targets"]
