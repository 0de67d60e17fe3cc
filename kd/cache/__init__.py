"""The teacher-output cache: top-k soft targets in Parquet, features in Zarr, a manifest.

`writer.label` builds it (resumably; `shards` resumes and merges, `targets` computes the
columns), `reader.Cache` serves it to students, `verify` checks it byte for byte; all find
its files through `layout`. The cache layer knows no task: `batch` says what it asks of one.
The columns are documented in the README.
"""

from kd.cache.batch import Batch
from kd.cache.layout import lse_column
from kd.cache.manifest import SCHEMA_VERSION, read_manifest
from kd.cache.reader import Cache, SoftTargets
from kd.cache.targets import soft_targets
from kd.cache.writer import Teacher, label

__all__ = ["SCHEMA_VERSION", "Batch", "Cache", "SoftTargets", "Teacher", "label", "lse_column", "read_manifest",
           "soft_targets"]
