"""DatasetChangedTrigger on a file and an S3 (moto over HTTP) dataset, run as the triggerer runs it.

The trigger's ``run()`` is driven in an event loop by a collector task, exactly as the
triggerer iterates it; the tests change the dataset and watch which events come out. A
"restart" is a new trigger instance with the same arguments (what a triggerer builds from the
database), after the old one was cancelled.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from airflow_aicenter.errors import ConfigurationError, DatasetError, StorageError
from airflow_aicenter.storage import open_store
from airflow_aicenter.triggers import DatasetChangedTrigger

POLL = 0.05
QUIET = 0.6  # about a dozen polls: long enough for an event that should not come to have come


class Dataset:
    """A dataset to change: a local folder, or a prefix in a moto bucket."""

    def __init__(self, uri: str, s3: Any = None, bucket: str = "", prefix: str = "", root: Path | None = None) -> None:
        self.uri, self.s3, self.bucket, self.prefix, self.root = uri, s3, bucket, prefix, root
        self.store_uri = ""  # the aicenter store the connection names

    def put(self, name: str, data: bytes) -> None:
        if self.s3 is not None:
            self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)
            return
        assert self.root is not None
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def recreate(self, name: str, data: bytes) -> None:
        """Write ``name`` anew with ``data``, with no moment in which it is missing: uploaded again over itself on S3;
        on disk a new file (new inode) with the old one's mtime, renamed over it (as ``rsync -t`` or ``cp -p`` leave it)."""
        if self.s3 is not None:
            self.put(name, data)
            return
        assert self.root is not None
        old = self.root / name
        fresh = self.root.parent / f".{name}.new"
        fresh.write_bytes(data)
        os.utime(fresh, ns=(old.stat().st_atime_ns, old.stat().st_mtime_ns))
        os.replace(fresh, old)

    def delete(self, name: str) -> None:
        if self.s3 is not None:
            self.s3.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
        else:
            assert self.root is not None
            (self.root / name).unlink()


@pytest.fixture(params=["file", "s3"])
def dataset(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """An existing dataset holding a.csv, and an aicenter_default connection naming a fresh store on the same backend."""
    if request.param == "file":
        root = tmp_path / "inbox"
        data = Dataset(root.as_uri(), root=root)
        data.store_uri = (tmp_path / "aicenter").as_uri()
    else:
        server = request.getfixturevalue("s3_env")
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing-secret")
        bucket = server.create_bucket()
        data = Dataset(f"s3://{bucket}/inbox/", s3=client, bucket=bucket, prefix="inbox")
        data.store_uri = f"s3://{bucket}/aicenter"
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": data.store_uri}}))
    data.put("a.csv", b"x,y\n1,2\n")
    return data


class Watch:
    """One running trigger: its events as the triggerer would receive them."""

    def __init__(self, trigger: DatasetChangedTrigger, store_uri: str) -> None:
        self.trigger, self.store_uri = trigger, store_uri
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None

    async def _collect(self) -> None:
        try:
            async for event in self.trigger.run():
                self.events.append(event.payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc

    async def __aenter__(self) -> Watch:
        self.task = asyncio.create_task(self._collect())
        store = open_store(self.store_uri)
        deadline = time.monotonic() + 30
        while not store.exists(self.trigger.state_key) and self.error is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL)  # until the first listing is recorded (at once after a restart: it was before)
        await asyncio.sleep(QUIET)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if self.events and exc[0] is None:
            # The trigger records a change as announced right after it yields the event (a triggerer that
            # dies in between announces it again: at least once). A restart simulated here is a graceful
            # one: let the record land before cancelling (on a loaded machine the cancel could win).
            store, want = open_store(self.store_uri), self.events[-1]["fingerprint"]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.error is None:
                try:
                    state = json.loads(store.get_bytes(self.trigger.state_key))
                except Exception:  # not written yet
                    state = {}
                if state.get("fingerprint") == want and state.get("announced"):
                    break
                await asyncio.sleep(POLL)
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def until(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and self.error is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
        assert self.error is None, self.error
        assert len(self.events) == count, self.events

    async def quiet(self, count: int) -> None:
        await asyncio.sleep(QUIET)
        assert self.error is None, self.error
        assert len(self.events) == count, f"expected {count} events, got {self.events}"


def watch(dataset: Dataset) -> Watch:
    return Watch(DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL), dataset.store_uri)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_fires_once_per_change_not_for_the_same_listing_nor_after_a_restart(dataset: Dataset) -> None:
    async def scenario() -> None:
        async with watch(dataset) as w:
            await w.quiet(0)  # data that was there when watching began is not news
            dataset.put("b.csv", b"x,y\n3,4\n5,6\n")
            await w.until(1)
            event = w.events[0]
            assert event["dataset"] == dataset.uri and event["files"] == 2 and event["bytes"] == 8 + 12
            assert len(event["fingerprint"]) == 64
            await w.quiet(1)  # once per change, not once per poll

            dataset.recreate("b.csv", b"x,y\n3,4\n5,6\n")  # re-created with the same listing: key, size, ETag / mtime
            await w.quiet(1)

            dataset.put("a.csv", b"x,y\n1,2\n7,8\n")  # the next change
            await w.until(2)
            assert w.events[1]["files"] == 2 and w.events[1]["fingerprint"] != event["fingerprint"]

        async with watch(dataset) as restarted:  # a triggerer restart: a new instance, same arguments
            await restarted.quiet(0)
            dataset.put("c.csv", b"new\n")
            await restarted.until(1)
            assert restarted.events[0]["files"] == 3

        dataset.put("d.csv", b"landed while no triggerer ran\n")
        async with watch(dataset) as late:
            await late.until(1)  # a change made while down is announced once on start
            assert late.events[0]["files"] == 4
            await late.quiet(1)

    run(scenario)


def test_the_same_bytes_with_a_new_mtime_is_a_change_on_a_file_store_not_on_s3(dataset: Dataset) -> None:
    """S3 ETags come from the content; a file store's listing has only the mtime (reading files would cost the content)."""

    async def scenario() -> None:
        async with watch(dataset) as w:
            if dataset.s3 is not None:
                dataset.put("a.csv", b"x,y\n1,2\n")  # same bytes, uploaded again: a new LastModified, the same ETag
            else:
                time.sleep(0.01)
                (dataset.root / "a.csv").write_bytes(b"x,y\n1,2\n")  # same bytes, written again: a new mtime
            if dataset.s3 is not None:
                await w.quiet(0)
            else:
                await w.until(1)

    run(scenario)


def test_an_emptied_dataset_is_not_announced_and_the_next_data_is(dataset: Dataset) -> None:
    async def scenario() -> None:
        async with watch(dataset) as w:
            dataset.delete("a.csv")
            await w.quiet(0)  # nothing to train on
            dataset.put("a.csv", b"x,y\n1,2\n")
            await w.until(1)
            assert w.events[0]["files"] == 1

    run(scenario)


def test_two_watchers_with_different_arguments_each_get_the_change(dataset: Dataset) -> None:
    async def scenario() -> None:
        fast = Watch(DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL), dataset.store_uri)
        slow = Watch(DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL * 3), dataset.store_uri)
        async with fast, slow:
            dataset.put("b.csv", b"1\n")
            await fast.until(1)
            await slow.until(1)

    run(scenario)


def test_the_listing_never_reads_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 TiB sparse file (reading it would take minutes) is listed at once: only names, sizes and mtimes count."""
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": (tmp_path / "aicenter").as_uri()}}))
    root = tmp_path / "big"
    data = Dataset(root.as_uri(), root=root)
    data.store_uri = (tmp_path / "aicenter").as_uri()
    data.put("a.csv", b"1\n")

    async def scenario() -> None:
        async with watch(data) as w:
            with open(root / "huge.bin", "wb") as fh:
                fh.truncate(2**40)
            await w.until(1, timeout=10)
            assert w.events[0]["bytes"] == 2**40 + 2

    run(scenario)


def test_a_dataset_that_does_not_exist_fails_the_trigger_with_its_name(tmp_path: Path, s3_env: Any, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": (tmp_path / "aicenter").as_uri()}}))
    bucket = s3_env.create_bucket()
    missing = [(tmp_path / "no-such-folder").as_uri(), f"s3://{bucket}/no/such/prefix"]

    async def first_error(uri: str) -> BaseException:
        events = DatasetChangedTrigger(dataset=uri, poll_interval=POLL).run()
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(events.__anext__(), 30)
        return info.value

    for uri in missing:
        error = asyncio.run(first_error(uri))
        assert isinstance(error, DatasetError), error
        assert f"dataset {uri} does not exist" in str(error) and "fix the URI" in str(error)
    assert not (tmp_path / "no-such-folder").exists(), "watching never creates the dataset"
    assert ".keep" in str(asyncio.run(first_error(missing[1])))

    error = asyncio.run(first_error("s3://no-such-bucket-here/inbox"))
    assert isinstance(error, StorageError) and "bucket 'no-such-bucket-here' does not exist" in str(error)

    for bad, message in ((dict(dataset="inbox/"), "s3://bucket/prefix or file:///absolute/path"),
                         (dict(dataset="s3://b/x", poll_interval=0), "above 0")):
        with pytest.raises(ConfigurationError, match=message.replace("/", ".").replace("(", ".")):
            DatasetChangedTrigger(**bad)  # type: ignore[arg-type]


def test_the_record_of_what_was_announced_lives_in_the_aicenter_store(dataset: Dataset, tmp_path: Path) -> None:
    trigger = DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL)

    async def scenario() -> None:
        async with Watch(trigger, dataset.store_uri) as w:
            dataset.put("b.csv", b"1\n")
            await w.until(1)
            await asyncio.sleep(QUIET)
            state = json.loads(open_store(dataset.store_uri).get_bytes(trigger.state_key))
            assert state["fingerprint"] == w.events[0]["fingerprint"] and state["announced"] is True

    run(scenario)
    assert trigger.state_key.startswith("triggers/") and trigger.state_key.endswith(".json")


# -- a real AssetWatcher in a DAG that Airflow parses ---------------------------------------
WATCHED_DAG = '''
from datetime import datetime
from airflow.sdk import DAG, Asset, AssetWatcher
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow_aicenter.triggers import DatasetChangedTrigger

DATA = {data!r}
with DAG("aicenter_test_watcher", start_date=datetime(2026, 1, 1), schedule=[
        Asset(DATA, watchers=[AssetWatcher(name="new-data", trigger=DatasetChangedTrigger(dataset=DATA, poll_interval=7))])]):
    EmptyOperator(task_id="retrain")
'''

FROM_DB = '''
import json
from airflow.models.trigger import Trigger
from airflow.utils.session import create_session
from airflow.triggers.base import BaseEventTrigger
with create_session() as session:
    rows = [(t.classpath, t.kwargs) for t in session.query(Trigger).all() if "DatasetChangedTrigger" in t.classpath]
print("ROWS=" + json.dumps(rows))
'''


@pytest.mark.airflow
def test_an_asset_watcher_in_a_parsed_dag_round_trips_and_fires(airflow_env, tmp_path: Path) -> None:
    """Airflow parses the DAG, stores the watcher's trigger (classpath + kwargs); built back from that, it fires."""
    inbox = tmp_path / "watched"
    inbox.mkdir()
    (inbox / "a.csv").write_text("x\n1\n")
    airflow_env.add_dag("aicenter_test_watcher.py", WATCHED_DAG.format(data=inbox.as_uri()))
    # Airflow keeps watcher triggers for active, unpaused DAGs only: parse, unpause, parse again
    for step in (("dags", "reserialize"), ("dags", "unpause", "aicenter_test_watcher"), ("dags", "reserialize")):
        done = airflow_env.run("airflow", *step)
        assert done.returncode == 0, done.stderr[-3000:]
    done = airflow_env.run("python", "-c", FROM_DB)
    assert done.returncode == 0, done.stderr[-3000:]
    # this DAG's watcher (the session's Airflow home may hold other tests' watched DAGs)
    rows = [row for row in json.loads(done.stdout.split("ROWS=", 1)[1]) if row[1].get("dataset") == inbox.as_uri()]
    assert [classpath for classpath, _ in rows] == ["airflow_aicenter.triggers.dataset.DatasetChangedTrigger"], rows
    classpath, kwargs = rows[0]
    assert kwargs == {"dataset": inbox.as_uri(), "poll_interval": 7, "aicenter_conn_id": "aicenter_default"}

    # what the triggerer does with the row: import the class, build it from the kwargs, run it
    script = f'''
import asyncio, json, os, pathlib
from airflow.sdk.module_loading import import_string
from airflow.triggers.base import BaseEventTrigger
trigger = import_string({classpath!r})(**{{**{kwargs!r}, "poll_interval": 0.05}})
assert isinstance(trigger, BaseEventTrigger)
async def main():
    events = trigger.run()
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(1)
    pathlib.Path({str(inbox / "b.csv")!r}).write_text("x\\n2\\n")
    print("EVENT=" + json.dumps((await asyncio.wait_for(first, 30)).payload))
asyncio.run(main())
'''
    done = airflow_env.run("python", "-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout.split("EVENT=", 1)[1])
    assert payload["dataset"] == inbox.as_uri() and payload["files"] == 2
    assert (airflow_env.home / "aicenter" / "triggers").is_dir(), "the embedded default store keeps the record"

