"""Our transfer code as a command, so it is timed like the peers (a fresh process each run).

    python benchmarks/ours.py download s3://BUCKET PREFIX DEST     (the runtime's staging)
    python benchmarks/ours.py download1 s3://BUCKET PREFIX DEST    (the same, every object on one stream:
                                                                    the single-stream baseline of ranged GETs)
    python benchmarks/ours.py upload SRC s3://BUCKET PREFIX        (artifacts upload)
    python benchmarks/ours.py blobs SRC s3://BUCKET                (package/snapshot blobs: hash, then ensure_blobs)
    python benchmarks/ours.py ceiling s3://BUCKET PREFIX           (GET every object, 64 in flight, bytes discarded)

``ceiling`` is not a product path: it is the fastest any client can read this server from
this machine (no disk write, no hash), to tell the server's limit from ours.

Credentials and endpoint come from the AWS_* variables, as in a training pod.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import (
    FileEntry,
    download_tree,
    ensure_blobs,
    local_files,
    run,
    sha256_file,
    upload_tree,
)


def main(argv: list[str]) -> int:
    op = argv[0]
    if op == "download1":
        from airflow_aicenter.storage import transfer

        transfer.RANGED_MIN = 2**62
        op = "download"
    if op == "download":
        uri, prefix, dest = argv[1], argv[2], Path(argv[3])
        entries = run(download_tree(open_store(uri), dest, prefix=prefix))
        print(len(entries), sum(e.size for e in entries))
    elif op == "upload":
        src, uri, prefix = Path(argv[1]), argv[2], argv[3]
        entries = run(upload_tree(src, open_store(uri), prefix))
        print(len(entries), sum(e.size for e in entries))
    elif op == "blobs":
        src, uri = Path(argv[1]), argv[2]
        entries = []
        for rel in local_files(src):
            e = sha256_file(src / rel)
            entries.append(FileEntry(rel, e.sha256, e.size))
        stats = run(ensure_blobs(open_store(uri), src, entries))
        print(stats)
    elif op == "ceiling":
        import obstore

        from airflow_aicenter.storage.transfer import gather_limited

        uri, prefix = argv[1], argv[2]
        store = open_store(uri)

        async def get(key: str) -> int:
            result = await obstore.get_async(store.inner, key)
            n = 0
            async for chunk in result.stream(min_chunk_size=2**20):
                n += len(chunk)
            return n

        sizes = run(gather_limited([i.key for i in store.list(prefix)], get))
        print(len(sizes), sum(sizes), flush=True)
        # Not a product path: skip interpreter teardown, where dropping obstore's finished
        # streams can abort the process (seen once after 201 large GETs) after the figure is taken.
        os._exit(0)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
