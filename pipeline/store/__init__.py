"""Storage: the schema (:mod:`pipeline.store.schema`) and its queries (:class:`Store`)."""

from pipeline.store.db import Store, migrations_dir, utcnow

__all__ = ["Store", "migrations_dir", "utcnow"]
