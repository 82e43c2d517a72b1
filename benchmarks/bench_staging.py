"""Figure 1: staging (download) and upload throughput, ours vs s5cmd, aws-cli and cp -r.

    benchmarks/.venv-peers/bin/... must exist: run `bash benchmarks/setup.sh` once.
    .venv/bin/python benchmarks/bench_staging.py [--servers rclone,moto] [--repeat 3] [--shapes small,large,huge]
        [--link plain,shaped] [--rate-mb 80] [--latency-ms 20] [--huge-mb 2048] [--file-store-mb 1024] [--save-as NAME]

For each S3 server (rclone serve s3, moto server; each in its own process on 127.0.0.1) and
each data shape (10,000 x 4 KB; 200 x 1 MB + 1 x 200 MB), every tool downloads the same
prefix into an empty folder and uploads the same local folder to a fresh prefix. Each tool
is a fresh process per run (ours: benchmarks/ours.py, the runtime's download_tree /
upload_tree). The figure is the median wall time of --repeat runs; ratios are computed
from numbers taken in this same run. `cp -r` copies the local source folder (page cache to
disk): the machine's own limit for writing those files. `ceiling` is no product path: GETs
of every object with 64 in flight, bytes discarded (no disk write, no hash), the fastest
any client can read that server on this machine; it tells the server's limit from ours.

``--link shaped`` puts benchmarks/shaped_link.py between the tools and the server: each
connection capped at --rate-mb MB/s and --latency-ms before each response's first byte, as a
real S3 link is (rclone's ranged GETs are answered by the link from rclone's folder: rclone
ignores Range). The ``huge`` shape is one object of --huge-mb MiB (a checkpoint or model):
ours (concurrent ranged GETs above transfer.RANGED_MIN) against ``ours 1 stream`` (the same code
with every object on one connection), s5cmd and aws-cli.

Every row also gives the tool's CPU seconds (user + system of its process): on 2 cores shared
with the server they are what its wall time is made of. ``--file-store-mb N`` adds the first
upload of one N MiB file to a file store (upload_file: LocalStore.put_file) against ``cp`` +
``sync`` of the same file; ``--save-as`` names the results file.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

from common import (
    PYTHON,
    ShapedServer,
    drop,
    machine,
    make_large_files,
    make_small_files,
    median,
    ours_cmd,
    peer,
    run_cmd,
    same_tree,
    save_json,
    server_kinds,
    servers,
    start_shaped,
    table,
    tree_size,
    verdict,
    work_dir,
)

SHAPES = {
    "small": "10,000 x 4 KB",
    "large": "200 x 1 MB + 1 x 200 MB",
    "huge": "1 x {mb:,} MB",
}


def seed_bucket(server, src: Path, bucket: str, prefix: str) -> None:
    """Put the dataset in the server (untimed), through its S3 API: rclone serve s3 caches
    directory listings, so files copied into its folder behind its back may stay invisible.
    A shaped link's data goes straight to the server behind it."""
    direct = server.direct
    run_cmd([peer("s5cmd"), "--endpoint-url", direct.endpoint, "cp", f"{src}/*", f"s3://{bucket}/{prefix}/"], direct.env())


def clear_prefix(server, bucket: str, prefix: str) -> None:
    direct = server.direct
    run_cmd([peer("s5cmd"), "--endpoint-url", direct.endpoint, "rm", f"s3://{bucket}/{prefix}/*"], direct.env())


#: CPU seconds (user + system) of each tool's runs, by (server kind, shape, op, tool): a 2-core machine
#: shared with the server makes a client's CPU its wall time, so the figure shows both.
CPU: dict[tuple[str, str, str, str], list[float]] = {}


def run_timed(cmd: list[str], env: dict[str, str], key: tuple[str, str, str, str]) -> float:
    """run_cmd, with the process's CPU seconds (its threads and children) recorded under ``key``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    took = run_cmd(cmd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(key, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return took


def bench_download(
    server, src: Path, work: Path, bucket: str, prefix: str, repeat: int, tools: list[str]
) -> dict[str, list[float]]:
    env, ep = server.env(), server.endpoint
    dest = work / "dest"
    commands = {
        "ours": lambda: ours_cmd("download", f"s3://{bucket}", prefix, str(dest)),
        "ours 1 stream": lambda: ours_cmd("download1", f"s3://{bucket}", prefix, str(dest)),
        "s5cmd": lambda: [peer("s5cmd"), "--endpoint-url", ep, "cp", f"s3://{bucket}/{prefix}/*", f"{dest}/"],
        "aws s3 sync": lambda: [peer("aws"), "--endpoint-url", ep, "s3", "sync", "--only-show-errors",
                                f"s3://{bucket}/{prefix}", str(dest)],
        "cp -r": lambda: ["cp", "-r", str(src), str(dest)],
        "ceiling": lambda: ours_cmd("ceiling", f"s3://{bucket}", prefix),
    }
    out: dict[str, list[float]] = {}
    for _ in range(repeat):  # interleaved, so drift (page cache, server state) hits every tool alike
        for tool in tools:
            drop(dest)
            took = run_timed(commands[tool](), env, (server.kind, src.name, "download", tool))
            if tool != "ceiling" and not same_tree(src, dest):
                raise RuntimeError(f"{tool} did not download the whole tree into {dest}")
            out.setdefault(tool, []).append(took)
            print(f"    download {tool:12s} {took:7.2f} s", flush=True)
    drop(dest)
    return out


def bench_upload(server, src: Path, bucket: str, repeat: int, tools: list[str]) -> dict[str, list[float]]:
    env, ep = server.env(), server.endpoint
    commands = {
        "ours": lambda p: ours_cmd("upload", str(src), f"s3://{bucket}", p),
        "s5cmd": lambda p: [peer("s5cmd"), "--endpoint-url", ep, "cp", f"{src}/*", f"s3://{bucket}/{p}/"],
        "aws s3 cp": lambda p: [peer("aws"), "--endpoint-url", ep, "s3", "cp", "--recursive", "--only-show-errors", str(src), f"s3://{bucket}/{p}"],
    }
    out: dict[str, list[float]] = {}
    n = 0
    for _ in range(repeat):
        for tool in tools:
            n += 1
            prefix = f"up{n}"
            took = run_timed(commands[tool](prefix), env, (server.kind, src.name, "upload", tool))
            out.setdefault(tool, []).append(took)
            print(f"    upload   {tool:12s} {took:7.2f} s", flush=True)
            clear_prefix(server, bucket, prefix)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(server_kinds("rclone")),
                        help="rclone and/or moto (one server per run keeps it under 5 min)")
    parser.add_argument("--shapes", default="small,large")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--aws-repeat", type=int, default=1, help="aws-cli is slow on 10,000 files: fewer runs of it")
    parser.add_argument("--ops", default="download,upload")
    parser.add_argument("--link", default="plain", help="plain (loopback as it is) and/or shaped (shaped_link.py)")
    parser.add_argument("--rate-mb", type=float, default=80.0, help="shaped link: MB/s per connection")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="shaped link: first-byte latency")
    parser.add_argument("--huge-mb", type=int, default=2048, help="size of the huge shape's one object (MiB)")
    parser.add_argument("--small-files", type=int, default=10_000, help="file count of the small shape")
    parser.add_argument("--file-store-mb", type=int, default=0,
                        help="also time the first upload of one file of this many MiB to a file store, against cp")
    parser.add_argument("--save-as", default="staging", help="name of the results file (results/NAME.json)")
    args = parser.parse_args()
    for tool in ("s5cmd", "aws"):
        if peer(tool) is None:
            raise SystemExit(f"{tool} is missing: run `bash benchmarks/setup.sh` first")

    work = work_dir("staging")
    try:
        run_all(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(args: argparse.Namespace, work: Path) -> None:
    print(f"machine: {machine()}\nwork folder: {work}", flush=True)
    sources = {}
    for shape in args.shapes.split(","):
        began = time.perf_counter()
        src = work / f"src-{shape}"
        if shape == "small":
            make_small_files(src, count=args.small_files)
        elif shape == "large":
            make_large_files(src)
        else:
            make_large_files(src, count=0, big=args.huge_mb * 2**20)
        files, size = tree_size(src)
        sources[shape] = (src, files, size)
        print(f"generated {shape}: {files} files, {size / 2**20:.1f} MiB in {time.perf_counter() - began:.1f} s", flush=True)

    results: dict = {"machine": machine(), "repeat": args.repeat, "figures": []}
    rows = []
    SHAPES["huge"] = SHAPES["huge"].format(mb=args.huge_mb)
    SHAPES["small"] = f"{args.small_files:,} x 4 KB"
    with servers(args.servers.split(","), work) as plain:
        started = []
        for server in plain:
            if "plain" in args.link:
                started.append(server)
            if "shaped" in args.link:
                started.append(start_shaped(server, args.rate_mb, args.latency_ms, work))
                print(f"shaped link {started[-1].endpoint} -> {server.endpoint}: {args.rate_mb:g} MB/s per connection, "
                      f"{args.latency_ms:g} ms to first byte", flush=True)
        results["link"] = {"rate_mb": args.rate_mb, "latency_ms": args.latency_ms}
        try:
            bench_servers(args, started, sources, results, rows)
        finally:
            for server in started:
                if isinstance(server, ShapedServer):
                    server.stop()

    print()
    print(table(rows, ["server", "shape", "op", "tool", "median s", "CPU-s", "files/s", "MiB/s", "ours is N x faster"]))
    if args.file_store_mb:
        results["file_store_upload"] = bench_file_store_upload(work, args.file_store_mb, args.repeat)
    print()
    print(targets(results["figures"]))
    path = save_json(args.save_as, results)
    print(f"\nraw results: {path}")


def bench_file_store_upload(work: Path, mb: int, repeat: int) -> dict[str, list[float]]:
    """The first upload of one large file to a file store (a package blob, an artifact), against
    ``cp`` + ``sync`` of the same file into the same folder: ours is a fresh process running
    upload_file (a kernel copy, hashed from the copy, fsynced, linked into place)."""
    src = work / "filestore-src.bin"
    make_large_files(work / "filestore-gen", count=0, big=mb * 2**20)
    (work / "filestore-gen" / "model.bin").rename(src)
    script = ("import sys, hashlib; from pathlib import Path; from airflow_aicenter.storage import open_store; "
              "from airflow_aicenter.storage.transfer import run, upload_file; "
              "run(upload_file(open_store(Path(sys.argv[1]).as_uri()), Path(sys.argv[2]), 'blobs/x', create=True))")
    out: dict[str, list[float]] = {}
    for _ in range(repeat):
        for tool in ("ours", "cp + sync"):
            store = work / "filestore"
            drop(store)
            store.mkdir()
            cmd = [str(PYTHON), "-c", script, str(store), str(src)] if tool == "ours" else \
                ["sh", "-c", f"cp {src} {store}/x && sync {store}/x"]
            took = run_timed(cmd, {}, ("file", "filestore", "upload", tool))
            out.setdefault(tool, []).append(took)
            print(f"    file store first upload of {mb} MiB: {tool:10s} {took:7.2f} s", flush=True)
    drop(work / "filestore")
    ours = median(out["ours"])
    for tool, times in out.items():
        cpu = CPU[("file", "filestore", "upload", tool)]
        print(f"file store upload {mb} MiB {tool:10s} median {median(times):.2f} s, CPU {median(cpu):.2f} s"
              + ("" if tool == "ours" else f", ours is {median(times) / ours:.2f}x faster"))
    return out


def tools_for(shape: str, op: str) -> list[str]:
    """Who runs on which shape: the huge object is about ranged GETs (ours vs ours on one stream)."""
    if op == "download":
        return ["ours", "ours 1 stream", "s5cmd"] if shape == "huge" else ["ours", "s5cmd", "cp -r", "ceiling"]
    return ["ours", "s5cmd"]


def bench_servers(args: argparse.Namespace, started: list, sources: dict, results: dict, rows: list) -> None:
    """Every shape on every server (plain or shaped), peers interleaved; rows and figures appended."""
    for server in started:
        bucket = "bench"
        if "bench" not in server.direct.buckets:
            server.create_bucket(bucket)
        for shape, (src, files, size) in sources.items():
            print(f"== {server.kind}: {SHAPES[shape]}", flush=True)
            prefix = f"data-{shape}"
            seed_bucket(server, src, bucket, prefix)
            # untimed warm-up: rclone's first listing of a new folder costs about a second
            run_cmd([peer("s5cmd"), "--endpoint-url", server.endpoint, "ls", f"s3://{bucket}/{prefix}/*"], server.env())
            figures = {}
            if "download" in args.ops:
                where = (server, src, src.parent, bucket, prefix)
                figures["download"] = bench_download(*where, args.repeat, tools_for(shape, "download"))
                if args.aws_repeat:
                    figures["download"] |= bench_download(*where, args.aws_repeat, ["aws s3 sync"])
            if "upload" in args.ops:
                figures["upload"] = bench_upload(server, src, bucket, args.repeat, tools_for(shape, "upload"))
                if args.aws_repeat:
                    figures["upload"] |= bench_upload(server, src, bucket, args.aws_repeat, ["aws s3 cp"])
            clear_prefix(server, bucket, prefix)
            for op, per_tool in figures.items():
                ours = median(per_tool["ours"])
                for tool, times in per_tool.items():
                    t = median(times)
                    cpu = CPU.get((server.kind, src.name, op, tool), [])
                    rows.append([server.kind, SHAPES[shape], op, tool, f"{t:.2f}", f"{median(cpu):.2f}" if cpu else "-",
                                 f"{files / t:,.0f}", f"{size / 2**20 / t:,.0f}",
                                 "-" if tool == "ours" else f"{t / ours:.2f}x"])
                    results["figures"].append({"server": server.kind, "shape": shape, "op": op, "tool": tool, "seconds": times,
                                               "median": t, "cpu_seconds": cpu, "files": files, "bytes": size,
                                               "ours_speedup": t / ours})


def targets(figures: list[dict]) -> str:
    """The issue's targets, checked against this run's numbers."""
    def speedup(server: str, shape: str, op: str, tool: str) -> float | None:
        for f in figures:
            if (f["server"], f["shape"], f["op"], f["tool"]) == (server, shape, op, tool):
                return f["ours_speedup"]
        return None

    lines = []
    for server in sorted({f["server"] for f in figures}):
        checks = [
            ("small download >= 1.0x s5cmd", speedup(server, "small", "download", "s5cmd"), 1.0),
            ("large download >= 1.0x s5cmd", speedup(server, "large", "download", "s5cmd"), 1.0),
            ("small download >= 5x aws s3 sync", speedup(server, "small", "download", "aws s3 sync"), 5.0),
            ("huge download >= 3x one stream", speedup(server, "huge", "download", "ours 1 stream"), 3.0),
        ]
        for label, value, target in checks:
            if value is not None:
                lines.append(f"{server:12s} {label:34s} {value:6.2f}x  {verdict(value >= target)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
