"""Helpers of the runtime tests, shared by their fixtures (conftest.py) and test modules."""

from __future__ import annotations

from airflow_aicenter.storage import Store

#: A package file bigger than one 3 MiB part (per-file staging).
BIG = 3 * 2**20 + 17


def put(store: Store, files: dict[str, str]) -> None:
    for key, text in files.items():
        store.put_bytes(key, text.encode())
