"""A stored environment is used only when its blob is the one its record names, byte for byte.

The damage that matters is not bytes that tar rejects (tests/runtime/test_environment.py covers
those) but a valid environment in the wrong place: another environment's blob, well formed,
unpacking cleanly, of exactly the size the record says. Only the digest comparison tells it
apart, and it must: restoring it would run one package with another package's dependencies.
Real uv, real environments, both stores.
"""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

from airflow_aicenter.layout import blob_key, env_key
from airflow_aicenter.records import read
from airflow_aicenter.runtime.environment import EnvironmentRecord
from airflow_aicenter.storage import Store
from tests.runtime.test_environment import imports_tiny, local_wheel_package, prepare

#: zstd's skippable frame (RFC 8878 3.1.2): decoders step over it, so the blob stays a valid zstd tar stream.
SKIPPABLE = 0x184D2A50


def padded_to(blob: bytes, size: int) -> bytes:
    """``blob`` followed by a skippable zstd frame that brings it to exactly ``size`` bytes (still a valid blob)."""
    room = size - len(blob) - 8
    assert room >= 0, f"the substitute ({len(blob)} bytes) must be smaller than the {size} bytes it replaces"
    return blob + struct.pack("<II", SKIPPABLE, room) + b"\0" * room


def test_another_environments_valid_blob_of_the_right_size_is_found_corrupt_and_rebuilt(
    store: Store, tmp_path: Path, closed_index: str
) -> None:
    # Two packages, two environments: "big" carries 32 KiB of incompressible payload, so its packed
    # environment is larger than "small"'s and small's blob can be padded to big's exact size.
    payload = base64.b64encode(os.urandom(24 * 1024)).decode()
    big_root = local_wheel_package(tmp_path, "big", value=1, extra={"payload.py": f"DATA = {payload!r}\n"})
    small_root = local_wheel_package(tmp_path, "small", value=2)
    big, small = prepare(big_root, store, tmp_path / "c1"), prepare(small_root, store, tmp_path / "c1")
    assert big.key != small.key and imports_tiny(big).startswith("1 ") and imports_tiny(small).startswith("2 ")
    big_record = read(store, env_key(big.key), EnvironmentRecord)
    small_record = read(store, env_key(small.key), EnvironmentRecord)
    assert big_record.blob.sha256 != small_record.blob.sha256

    # big's blob replaced by small's whole, valid environment, padded to the size big's record says:
    # it unpacks without an error and passes every size check; only its digest differs.
    substitute = padded_to(store.get_bytes(blob_key(small_record.blob.sha256)), big_record.blob.size)
    store.put_bytes(blob_key(big_record.blob.sha256), substitute)
    assert len(store.get_bytes(blob_key(big_record.blob.sha256))) == big_record.blob.size

    said: list[str] = []
    restored = prepare(big_root, store, tmp_path / "c2", said)  # a new machine: only the store has it
    assert restored.source == "installed", f"another environment's blob was used as {big.key[:12]}'s: {said}"
    assert imports_tiny(restored).startswith("1 "), "the package got another package's dependencies"
    corrupt = [line for line in said if "is corrupt" in line and big_record.blob.sha256 in line]
    assert corrupt and "cannot be used" in corrupt[0] and "installing it again" in corrupt[0], said

    again = prepare(big_root, store, tmp_path / "c3")
    assert again.source == "store" and imports_tiny(again).startswith("1 "), "the rebuilt environment serves the next run"
