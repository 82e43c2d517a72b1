"""Object storage over obstore: one interface, an S3 and a local-disk backend."""

from airflow_aicenter.storage.store import LocalStore, ObjectInfo, S3Options, S3Store, Store, open_store

__all__ = ["LocalStore", "ObjectInfo", "S3Options", "S3Store", "Store", "open_store"]
