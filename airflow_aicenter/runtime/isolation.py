"""Linux process hardening for the local runtime: what separates the agent from package code.

DESIGN "★ Trust boundaries", "Locally". Hiding variables is not a boundary: a process of the
same uid reads another's ``/proc/<pid>/environ`` and ``/proc/<pid>/mem``. So:

- the agent makes itself non-dumpable (:func:`make_undumpable`): the kernel then refuses those
  files to every process of the same uid (root still reads them, so as root only another uid
  separates: the connection extra ``run_as_user``, :func:`resolve_user`);
- the process that starts user processes is the *subreaper* of everything they start
  (:func:`become_subreaper`): a daemon that called ``setsid()`` and lost its parent is
  reparented to it instead of to init, so :func:`kill_descendants` still finds and kills it;
- what even a SIGKILL of worker and agent together leaves behind (a daemon reparented to init)
  is found by the next launch: each launch folder is locked (:func:`hold_lock`) for as long as
  its launcher lives, and :func:`sweep` removes the folders nobody holds and kills the processes
  whose working directory lies inside them;
- what another user can reach is asked of a process of that user (:func:`probe_as`): the local
  launcher proves with it, before a run, that ``run_as_user`` cannot read the worker's own Python
  environment and can run the interpreter package environments are made from.

Standard library only and no import of ``airflow_aicenter``: the user supervisor loads this file
by path (in a pod it is copied beside it as ``aicenter_isolation.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
#: Where the local launcher's folders live, and their name: one per launch.
LAUNCH_PREFIX = "aicenter-launch-"
#: The lock a live launcher holds (flock) on its launch folder; nobody holding it means its owner is dead.
LOCK_NAME = ".lock"
#: Seconds after which a launch folder without a lock, with nothing running in it, counts as abandoned.
UNLOCKED_PATIENCE = 300.0
#: How long :func:`kill_descendants` keeps killing what keeps appearing (a fork loop) before giving up.
KILL_PATIENCE = 10.0


def _prctl(option: int, arg: int) -> bool:
    """``prctl(option, arg)``; False where the call is not available (not Linux) or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def make_undumpable() -> bool:
    """No core dumps and no ``/proc/<self>/environ`` or ``mem`` for other processes of this uid (root excepted).

    Called first thing by the agent, before it reads its run spec or opens the store, so the
    store's keys in its environment and memory are out of reach of package code.
    """
    return _prctl(PR_SET_DUMPABLE, 0)


def become_subreaper() -> bool:
    """Orphaned descendants (a ``setsid()`` daemon whose parent exited) are reparented to this process."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """The kernel sends ``sig`` to this process when its parent thread ends (cleared by a change of uid)."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))


# -- the process table -------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, session)`` of ``pid`` from ``/proc/<pid>/stat``; None when it is gone.

    Plain ``os`` calls: every run's end reads this for every process of the machine (a third of the time of ``Path``).
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0].decode(), int(fields[1]), int(fields[3])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _table() -> dict[int, tuple[str, int, int]]:
    """``(state, ppid, session)`` of every process: one pass over ``/proc``."""
    table: dict[int, tuple[str, int, int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            table[pid] = stat
    return table


def descendants(root: int, table: dict[int, tuple[str, int, int]] | None = None) -> dict[int, int]:
    """Every live (non-zombie) descendant of ``root``: pid -> session id (from ``table`` when given)."""
    table = _table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        state, _, session = table[pid]
        if state not in ("Z", "X"):
            found[pid] = session
        todo.extend(children.get(pid, []))
    return found


def kill_descendants(root: int | None = None, *, spare_session: int | None = None,
                     patience: float = KILL_PATIENCE) -> int:
    """SIGKILL every descendant of ``root`` (default: this process), again until none is left.

    ``spare_session`` leaves alone the descendants in that session: the agent's own helpers
    (an environment being packed) run in the agent's session, which no user process can join
    (each starts a session of its own, and sessions cannot be entered from outside), so
    everything user code started, ``setsid`` daemons included, is outside it. Zombies this
    process inherited (orphans, as subreaper) are reaped. Returns how many were killed.
    """
    root = os.getpid() if root is None else root
    killed = 0
    deadline = time.monotonic() + patience
    while True:
        table = _table()
        found = [pid for pid, session in descendants(root, table).items() if session != spare_session]
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        if root == os.getpid():
            reap_orphans(table=None if found else table)  # the same pass when nothing was killed since
        if not found or time.monotonic() > deadline:
            return killed
        time.sleep(0.02)


def reap_orphans(known: Iterable[int] = (), table: dict[int, tuple[str, int, int]] | None = None) -> None:
    """Collect the exit status of this process's zombie children that no ``Popen`` waits for.

    As subreaper this process inherits killed orphans; their zombies would stay until it ends.
    Only zombies are reaped (a live child is left to whoever started it), and never ``known`` pids.
    """
    skip = set(known)
    me = os.getpid()
    for pid, stat in (_table() if table is None else table).items():
        if stat[1] == me and stat[0] == "Z" and pid not in skip:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


# -- identities --------------------------------------------------------------------------------
def resolve_user(value: str | int) -> tuple[int, int]:
    """``(uid, gid)`` of ``run_as_user``: a user name or a numeric uid (gid: the user's, else the uid)."""
    text = str(value).strip()
    if text.isdigit():
        uid = int(text)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid
    try:
        entry = pwd.getpwnam(text)
    except KeyError:
        raise LookupError(f"run_as_user {text!r} is not a user on this machine; give an existing user name or a uid") from None
    return entry.pw_uid, entry.pw_gid


#: Run by :func:`probe_as` as another user: the interpreter's version, and for each path given whether it
#: may read it and whether it may enter (search) it. ``os.access`` asks the kernel for the real uid, so
#: modes, ACLs and every folder on the way count.
_PROBE = (
    "import json, os, sys; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
    "'access': [[os.access(p, os.R_OK), os.access(p, os.X_OK)] for p in sys.argv[1:]]}))"
)


def probe_as(uid: int, gid: int, python: str, paths: Iterable[Path | str] = ()) -> dict[str, Any] | None:
    """Ask ``python``, run as ``uid``:``gid`` without supplementary groups (as user processes run), what that user can do.

    Returns ``{"version": "3.11", "access": [[readable, enterable], ...]}`` for ``paths``, or None
    when that user cannot run ``python`` at all (missing, or a folder on its way closed to it). A
    real process of that user, so the answer is the kernel's, not a reading of mode bits. Needs root.
    """
    try:
        done = subprocess.run([python, "-I", "-S", "-c", _PROBE, *map(str, paths)], user=uid, group=gid, extra_groups=[],
                              cwd="/", env={"PATH": os.defpath}, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def hand_over(work: Path, uid: int, gid: int, writable: Iterable[Path]) -> None:
    """Give ``run_as`` what it may write in the work folder, and nothing else of it.

    The work folder becomes traversable but not listable (0711): user processes reach the
    folders whose paths they are given and read what the agent staged there (data, package,
    instructions: created world-readable), but write only ``writable`` (made theirs, through no
    link) and never see the folder's own files (its lock). The agent keeps everything else.
    """
    work.chmod(0o711)
    for folder in writable:
        folder.mkdir(parents=True, exist_ok=True)
        for path in _tree(folder):
            os.chown(path, uid, gid, follow_symlinks=False)


def _tree(folder: Path) -> Iterable[Path]:
    """``folder`` and everything under it, without following links."""
    yield folder
    for base, dirs, files in os.walk(folder, followlinks=False):
        for name in (*dirs, *files):
            yield Path(base) / name


# -- launch folders ----------------------------------------------------------------------------
def hold_lock(folder: Path) -> int:
    """Lock ``folder`` for as long as the returned descriptor is open in any process (it dies with its holders).

    A child given the descriptor (``pass_fds``) shares the lock: the folder stays locked until
    the launcher and the runtime have both ended.
    """
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _abandoned(folder: Path) -> bool:
    """Whether no live process holds ``folder``'s lock (an unlocked one only when it is old and nothing runs in it)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return False  # another user's launch: not ours to judge
    except OSError:  # no lock: one being created, or one of a launcher that died before it locked
        try:
            old = time.time() - folder.stat().st_mtime > UNLOCKED_PATIENCE
        except OSError:
            return False
        return old and not processes_in(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its launcher is alive
    finally:
        os.close(fd)  # closing drops our own lock again
    return True


def processes_in(folder: Path) -> list[int]:
    """Processes left by a dead run in ``folder``: working directory, executable or an open file inside it,
    or its folders in their environment (user processes get ``artifacts_directory`` & co., and what
    they start inherits them, a daemon that changed to ``/`` included).
    """
    inside: list[int] = []
    base = str(folder.resolve())
    marker = (base + "/").encode()

    def within(target: str) -> bool:
        return target == base or target.startswith(base + "/")

    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/{name}") for name in ("cwd", "exe")]
            with contextlib.suppress(OSError):
                links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to look at
        if any(within(target) for target in links) or marker in environ:
            inside.append(pid)
    return inside


def clear(folder: Path) -> None:
    """Kill whatever still runs in a launch folder, then remove the folder."""
    for _ in range(3):  # a process may start another while we kill: look again
        pids = processes_in(folder)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    shutil.rmtree(folder, ignore_errors=True)


def sweep(parent: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the launch folders under ``parent`` whose launcher is dead, killing what still runs in them.

    Liveness is exact: a live launcher holds its folder's lock (:func:`hold_lock`), and the kernel
    drops the lock when that process dies, however it died. Returns the folders removed.
    """
    removed: list[Path] = []
    try:
        folders = [p for p in parent.iterdir() if p.name.startswith(LAUNCH_PREFIX) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for folder in folders:
        if not _abandoned(folder):
            continue
        clear(folder)
        if not folder.exists():
            removed.append(folder)
            if log is not None:
                log(f"removed {folder}, left by a run whose launcher died")
    return removed
