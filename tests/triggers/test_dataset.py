"""DatasetChangedTrigger on a file and an S3 (moto over HTTP) dataset, run as the triggerer runs it.

The trigger's ``run()`` is driven in an event loop by a collector task, exactly as the
triggerer iterates it; the tests change the dataset and watch which events come out. A
"restart" is a new trigger instance with the same arguments (what a triggerer builds from the
database), after the old one was cancelled, given the same asset state store (what Airflow's
triggerer hands an asset watcher's trigger: here a stand-in for its database, ``AssetState``;
the last test runs a real triggerer on a real database).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import ConfigurationError, DatasetError, NotFoundError, StorageError
from airflow_aicenter.storage import open_store
from airflow_aicenter.triggers import DatasetChangedTrigger
from airflow_aicenter.triggers.dataset import listing_of
from tests.conftest import BIN
from tests.triggers.datasets import AssetState, Dataset

POLL = 0.05
QUIET = 0.6  # about a dozen polls: long enough for an event that should not come to have come


class Watch:
    """One running trigger: its events as the triggerer would receive them."""

    def __init__(self, trigger: DatasetChangedTrigger, state: AssetState) -> None:
        self.trigger, self.state = trigger, state
        trigger.asset_state_store = state  # as the triggerer does for a trigger that watches an asset
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
        deadline = time.monotonic() + 30
        while self.state.get(self.trigger.state_key) is None and self.error is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL)  # until the first listing is recorded (at once after a restart: it was before)
        # No quiet wait here: a test that says nothing must come on start waits with quiet(0); one that
        # counts events with until() would see a spurious start event in its count anyway.
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if self.events and exc[0] is None:
            # The trigger records a change as announced right after it yields the event (a triggerer that
            # dies in between announces it again: at least once). A restart simulated here is a graceful
            # one: let the record land before cancelling (on a loaded machine the cancel could win).
            want = self.events[-1]["fingerprint"]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.error is None:
                state = self.state.get(self.trigger.state_key) or {}
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
    return Watch(DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL), dataset.state)


def store_keys(dataset: Dataset) -> list[str]:
    """What the aicenter store the connection names holds (none of it written by the trigger)."""
    try:
        return [info.key for info in open_store(dataset.store_uri).list()]
    except NotFoundError:  # a file store never written to: no folder
        return []


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


def forge_store_state(dataset: Dataset, trigger: DatasetChangedTrigger) -> str:
    """Write "the current listing was announced" where the trigger kept its state in the aicenter store, with the
    access a run has there (a file store's folder; on S3 the store's own keys, as an ``aws_secret_name`` Secret
    gives them to pods): what a run that wants the next change ignored would write. The forged key."""
    _, kwargs = trigger.serialize()
    key = f"triggers/{hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()}.json"
    current = listing_of(open_store(dataset.uri))
    forged = {"dataset": dataset.uri, "fingerprint": current.fingerprint, "files": current.files, "bytes": current.bytes,
              "announced": True, "at": "2026-01-01T00:00:00+00:00"}
    if dataset.s3 is not None:  # the run's credentials: the store's access keys
        bucket, prefix = dataset.store_uri.removeprefix("s3://").split("/", 1)
        dataset.s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=json.dumps(forged).encode())
    else:
        path = Path(dataset.store_uri.removeprefix("file://")) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(forged))
    return key


def test_a_run_cannot_silence_the_trigger_by_forging_its_state(dataset: Dataset) -> None:
    """A run can write the aicenter store (its own folder on a file store; anything with the store's keys on S3):
    state forged there must not make a restarted trigger skip a real change, nor announce one twice."""

    async def scenario() -> None:
        async with watch(dataset) as w:
            dataset.put("b.csv", b"1\n")
            await w.until(1)

        dataset.put("c.csv", b"landed while no triggerer ran\n")  # a real change, not yet announced
        forge_store_state(dataset, w.trigger)  # ... that a run marks as announced
        async with watch(dataset) as restarted:
            await restarted.until(1)  # announced anyway, once
            assert restarted.events[0]["files"] == 3
            await restarted.quiet(1)
            forge_store_state(dataset, restarted.trigger)  # forged while the trigger runs: read by the next start
            dataset.put("d.csv", b"the next change\n")
            await restarted.until(2)
            await restarted.quiet(2)

        forge_store_state(dataset, restarted.trigger)
        async with watch(dataset) as again:  # nothing changed since the last announcement: no event
            await again.quiet(0)
            dataset.put("e.csv", b"and the next\n")
            await again.until(1)
            assert again.events[0]["files"] == 5

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
        fast = Watch(DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL), dataset.state)
        slow = Watch(DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL * 3), dataset.state)
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


def test_the_record_of_what_was_announced_lives_in_the_asset_state_store_not_the_aicenter_store(dataset: Dataset) -> None:
    trigger = DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL)

    async def scenario() -> None:
        async with Watch(trigger, dataset.state) as w:
            dataset.put("b.csv", b"1\n")
            await w.until(1)
            await asyncio.sleep(QUIET)
            state = dataset.state.get(trigger.state_key)
            assert state["fingerprint"] == w.events[0]["fingerprint"] and state["announced"] is True

    run(scenario)
    assert trigger.state_key.startswith("aicenter.dataset_changed.") and len(trigger.state_key) <= 512
    assert not store_keys(dataset), "the trigger writes nothing into the aicenter store"


async def fires_once_for_one_change(trigger: DatasetChangedTrigger, dataset: Dataset) -> None:
    """Run ``trigger`` as is (whatever state store it was given), add a file: one event, and no second one."""
    events = trigger.run()
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(QUIET)
    dataset.put("b.csv", b"1\n")
    assert (await asyncio.wait_for(first, 20)).payload["files"] == 2
    second = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(QUIET)
    assert not second.done(), "fired again without a change"
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second


def test_without_an_asset_state_store_the_state_is_kept_in_memory_with_a_warning(
    dataset: Dataset, capfd: pytest.CaptureFixture[str]
) -> None:
    """Outside an AssetWatcher (no state store from the triggerer) it still fires once per change, and says that a
    restart will miss a change made while it was down; it never falls back to a store that runs can write."""
    trigger = DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL)

    run(lambda: fires_once_for_one_change(trigger, dataset))
    said = "".join(capfd.readouterr())  # the trigger's log (Airflow's structlog writes to the process's output)
    assert "without an asset state store" in said and "kept in memory only" in said, said
    assert not store_keys(dataset), "the trigger writes nothing into the aicenter store"


def test_one_trigger_for_watchers_of_two_assets_keeps_its_state_in_memory_with_a_warning(
    dataset: Dataset, capfd: pytest.CaptureFixture[str]
) -> None:
    """Airflow runs one trigger for identical watchers on two assets and hands it both assets' state store, which
    refuses a key without saying which asset (Airflow's own ``AssetStateStoreAccessors``): still one event per change."""
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import AssetStateStoreAccessors

    trigger = DatasetChangedTrigger(dataset=dataset.uri, poll_interval=POLL)
    trigger.asset_state_store = AssetStateStoreAccessors(inlets=[Asset(name="a", uri=dataset.uri), Asset(name="b", uri=dataset.uri)])

    run(lambda: fires_once_for_one_change(trigger, dataset))
    said = "".join(capfd.readouterr())
    assert "no single asset state store" in said and "its own arguments" in said, said
    assert not store_keys(dataset), "the trigger writes nothing into the aicenter store"


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
    assert not (airflow_env.home / "aicenter" / "triggers").exists(), "no trigger state in the store runs can write"



# -- a real triggerer: the state in Airflow's asset state store, forged state in the store ignored ---------
REAL_DAG = '''
from datetime import datetime
from airflow.sdk import DAG, Asset, AssetWatcher
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow_aicenter.triggers import DatasetChangedTrigger

DATA = {data!r}
with DAG("aicenter_test_real_triggerer", start_date=datetime(2026, 1, 1), schedule=[
        Asset(DATA, watchers=[AssetWatcher(name="new-data", trigger=DatasetChangedTrigger(dataset=DATA, poll_interval=0.2))])]):
    EmptyOperator(task_id="retrain")
'''

# Waits (in one process: each `python -c` pays Airflow's imports) until the asset has WANT events and the
# trigger's record in the asset state store says the last one was announced (WANT 0: the first listing is
# recorded), then SETTLE seconds more, in which nothing else may come; prints what it saw.
SEEN = '''
import json, sys, time
from sqlalchemy import select
from airflow.models.asset import AssetEvent, AssetModel
from airflow.models.asset_state_store import AssetStateStoreModel
from airflow.utils.session import create_session

uri, want, key, settle = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])

def look():
    with create_session() as session:
        events = session.scalars(select(AssetEvent.extra).join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                                 .where(AssetModel.uri == uri).order_by(AssetEvent.id)).all()
        state = session.scalar(select(AssetStateStoreModel.value).join(AssetModel, AssetModel.id == AssetStateStoreModel.asset_id)
                               .where(AssetModel.uri == uri, AssetStateStoreModel.key == key))
    return [e["payload"] for e in events], json.loads(state) if state else None

deadline = time.monotonic() + 120
while True:
    events, state = look()
    recorded = state is not None and (want == 0 or (state["announced"] and events and state["fingerprint"] == events[-1]["fingerprint"]))
    if (recorded and len(events) >= want) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
time.sleep(settle)
events, state = look()
print("SEEN=" + json.dumps({"events": events, "state": state}))
'''


class Triggerer:
    """``airflow triggerer`` in the test's AIRFLOW_HOME, stopped as a deployment stops it (SIGTERM)."""

    def __init__(self, airflow_env: Any, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen([str(BIN / "airflow"), "triggerer"], env=airflow_env.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.mark.airflow
@pytest.mark.timeout(420)  # two triggerer starts and graceful stops: about 2.5 min on a loaded 2-core machine
def test_a_real_triggerer_keeps_its_state_where_runs_cannot_write_it(airflow_env, tmp_path: Path) -> None:
    """Airflow's own triggerer runs the watcher: the state lands in the asset state store, and state forged in the
    aicenter store (as a run could write it) neither silences a change made while the triggerer was down nor
    makes one fire twice."""
    inbox = tmp_path / "watched-by-a-triggerer"
    inbox.mkdir()
    (inbox / "a.csv").write_text("x\n1\n")
    uri = inbox.as_uri()
    airflow_env.add_dag("aicenter_test_real_triggerer.py", REAL_DAG.format(data=uri))
    # parsed once, unpaused from the start: Airflow keeps watcher triggers for active, unpaused DAGs only
    done = airflow_env.run("airflow", "dags", "reserialize", extra_env={"AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False"})
    assert done.returncode == 0, done.stderr[-3000:]
    trigger = DatasetChangedTrigger(dataset=uri, poll_interval=0.2)
    log = tmp_path / "triggerer.log"

    def seen(want: int, settle: float = 0) -> dict[str, Any]:
        done = airflow_env.run("python", "-c", SEEN, uri, str(want), trigger.state_key, str(settle), timeout=200)
        assert done.returncode == 0 and "SEEN=" in done.stdout, done.stderr[-3000:] + log.read_text()[-3000:]
        return json.loads(done.stdout.split("SEEN=", 1)[1])

    first = Triggerer(airflow_env, log)
    try:
        watching = seen(0)
        assert watching["events"] == [] and watching["state"]["files"] == 1, watching  # the first listing, recorded
        (inbox / "b.csv").write_text("x\n2\n")
        changed = seen(1)
        assert [e["files"] for e in changed["events"]] == [2], changed
    finally:
        first.stop()

    (inbox / "c.csv").write_text("x\n3\n")  # lands while no triggerer runs
    forged = {"dataset": uri, "fingerprint": listing_of(open_store(uri)).fingerprint, "announced": True}
    _, kwargs = trigger.serialize()
    legacy = airflow_env.home / "aicenter" / "triggers" / f"{hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()}.json"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_text(json.dumps(forged))  # where the trigger kept its state before, writable by runs

    second = Triggerer(airflow_env, log)
    try:
        restarted = seen(2, settle=3)
    finally:
        second.stop()
    assert [e["files"] for e in restarted["events"]] == [2, 3], restarted  # the change made while down, once
    assert restarted["state"]["fingerprint"] == restarted["events"][-1]["fingerprint"], restarted
    assert "without an asset state store" not in log.read_text(), "the triggerer handed the trigger its asset's store"
