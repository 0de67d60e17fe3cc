"""The teacher-output cache: top-k soft targets in Parquet, features in Zarr, a manifest.

`writer.label` builds it (resumably), `reader.Cache` serves it to students, `verify`
checks it byte for byte. The layout and columns are documented in the README.
"""

from pipeline.cache.manifest import SCHEMA_VERSION, lse_column, read_manifest
from pipeline.cache.reader import Cache, SoftTargets
from pipeline.cache.writer import Teacher, label, soft_targets

__all__ = ["SCHEMA_VERSION", "Cache", "SoftTargets", "Teacher", "label", "lse_column", "read_manifest",
           "soft_targets"]
