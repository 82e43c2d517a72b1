"""Figure 4: registry scale: requests to resolve "latest" and to register a version, by version count.

    .venv/bin/python benchmarks/bench_registry.py [--counts 1,10,100,1000]

A package gets N versions (1.0 .. 1.N-1, made with the registry's own commit), then we count
the store requests of: resolve("latest"), resolve("1") (latest minor of 1), get("1.0"), and
registering one more version the way the operator does (commit_once: retry-safe). Requests
are counted by wrapping the Store's primitive methods (each GET/HEAD/PUT/LIST page/DELETE is
one). "no hint" deletes the best-effort hint first: the worst case, a gallop and bisect over
HEADs (O(log N)). Target: resolve O(1), independent of N. Server: moto (it honours the
create-once If-None-Match the registry relies on; rclone serve s3 does not).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter

from common import REPO, machine, save_json, servers, table, verdict, work_dir

sys.path.insert(0, str(REPO))


class Counting:
    """Counts the requests a Store makes, by method."""

    PRIMITIVES = ("get_bytes", "put_bytes", "head", "copy", "delete", "list_dir")

    def __init__(self, store) -> None:
        self.store = store
        self.counts: Counter[str] = Counter()
        for name in self.PRIMITIVES:
            original = getattr(store, name)
            setattr(store, name, self._wrap(name, original))
        original_list = store.list

        def counted_list(prefix: str = ""):
            self.counts["list"] += 1
            for n, item in enumerate(original_list(prefix), start=1):
                if n % 1000 == 0:
                    self.counts["list"] += 1  # one request per page of 1,000
                yield item

        store.list = counted_list

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    def measure(self, fn) -> tuple[int, dict[str, int], float, object]:
        self.counts.clear()
        began = time.perf_counter()
        value = fn()
        took = time.perf_counter() - began
        return sum(self.counts.values()), dict(self.counts), took, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,10,100,1000")
    args = parser.parse_args()
    from airflow_aicenter.records import BlobRef, RunRef
    from airflow_aicenter.registry import Registry

    counts = [int(c) for c in args.counts.split(",")]
    work = work_dir("registry")
    rows, results = [], {"machine": machine(), "rows": []}
    per_op: dict[str, list[int]] = {}
    try:
        with servers(["moto"], work) as (server,):
            bucket = server.create_bucket("bench")
            for n in counts:
                store = server.store(f"s3://{bucket}/n{n}")
                registry = Registry(store)
                blob = BlobRef(sha256="0" * 64, size=1)
                store.put_bytes("blobs/sha256/" + "0" * 64, b"x")
                began = time.perf_counter()
                registry.commit("scale", parent=None, blob=blob, pipeline="upload")
                for _ in range(n - 1):
                    registry.commit("scale", parent="1.0", blob=blob, pipeline="train")
                print(f"made {n} versions in {time.perf_counter() - began:.1f} s", flush=True)
                counting = Counting(store)
                # every lambda below runs within this iteration: binding the loop's registry, n and blob is meant
                ops = {
                    'resolve("latest")': lambda: registry.resolve("scale", "latest"),  # noqa: B023
                    'resolve("1")': lambda: registry.resolve("scale", "1"),  # noqa: B023
                    'get("1.0")': lambda: registry.get("scale", "1.0"),  # noqa: B023
                    "register (commit_once)": lambda: registry.commit_once(  # noqa: B023
                        "scale", run=RunRef(dag_id="d", run_id="r", task_id="t", try_number=n), parent="1.0", blob=blob,  # noqa: B023
                        pipeline="train"),
                }
                for label, fn in ops.items():
                    total, detail, took, value = counting.measure(fn)
                    per_op.setdefault(label, []).append(total)
                    rows.append([n, label, total, " ".join(f"{k}={v}" for k, v in sorted(detail.items())), f"{took * 1000:.0f}"])
                    results["rows"].append({"versions": n, "op": label, "requests": total, "detail": detail, "ms": took * 1000})
                expected_latest = f"1.{n}"  # after the registration above
                store.delete("packages/scale/hints/1")
                store.delete("packages/scale/hints/major")
                total, detail, took, value = counting.measure(lambda: registry.resolve("scale", "latest"))  # noqa: B023
                assert value.version == expected_latest, (value.version, expected_latest)
                rows.append([n, 'resolve("latest"), no hint', total, " ".join(f"{k}={v}" for k, v in sorted(detail.items())),
                             f"{took * 1000:.0f}"])
                results["rows"].append({"versions": n, "op": "resolve latest without hint", "requests": total, "detail": detail})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows, ["versions", "operation", "requests", "by kind", "ms"]))
    print()
    for label, totals in per_op.items():
        flat = len(set(totals)) == 1
        print(f"{label:24s} requests at {counts}: {totals}  independent of the count: {verdict(flat)}")
    print(f"\nraw results: {save_json('registry', results)}")


if __name__ == "__main__":
    main()
