"""A running job's heartbeat in its MLflow run: who runs it, and that it still does.

    from pipeline.tracking.heartbeat import Heartbeat, process_tags
    run = client.create_run(exp_id, tags={**process_tags(30.0), ...})   # host, pid, first beat
    beat = Heartbeat(uri, run.info.run_id, interval_s=30.0).start()    # a daemon thread
    ...
    beat.stop()                                                          # before ending the run

Tags (set when the run is created, so a run never exists without them):

- ``pipeline.host``, ``pipeline.pid``, ``pipeline.pid_start`` (the process's start time, seconds since
  the epoch: a reused pid is another process), ``pipeline.host_id`` (boot id + pid namespace:
  pipeline/system/processes.py);
- ``pipeline.heartbeat`` (UTC, ISO 8601), rewritten every ``interval_s`` by the thread, and
  ``pipeline.heartbeat_s`` (that interval);
- ``pipeline.cgroup`` and ``pipeline.cgroup_oom_kills``: the job's memory cgroup and its OOM-kill count
  at start, so that the reaper (reaper.py) can tell an OOM kill from another death.

One beat is one ``set_tag`` plus one ``get_run`` (a few ms on SQLite, one request each on a server).
A beat that fails is logged and retried at the next one. If the run was ended by a reaper while this
process is alive (a host suspended past the staleness), the beat puts it back to RUNNING and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

from pipeline.system import cgroups, processes

log = logging.getLogger(__name__)

HOST, PID, PID_START, HOST_ID = "pipeline.host", "pipeline.pid", "pipeline.pid_start", "pipeline.host_id"
BEAT, INTERVAL = "pipeline.heartbeat", "pipeline.heartbeat_s"
CGROUP, CGROUP_OOM = "pipeline.cgroup", "pipeline.cgroup_oom_kills"
REAPED, REAPED_AT, REAPED_BY = "pipeline.reaped", "pipeline.reaped_at", "pipeline.reaped_by"  # reaper.py


def utc_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc).isoformat(
        timespec="milliseconds"
    )


def parse_iso(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def process_tags(interval_s: float) -> dict[str, str]:
    me = processes.identity()
    tags = {
        HOST: me.host,
        PID: str(me.pid),
        PID_START: f"{me.start:.3f}",
        HOST_ID: me.host_id,
        BEAT: utc_iso(),
        INTERVAL: f"{interval_s:g}",
    }
    group = cgroups.memory_group()
    kills = cgroups.oom_kills(group)
    if kills is not None:
        tags.update({CGROUP: str(group), CGROUP_OOM: str(kills)})
    return tags


class Heartbeat:
    """Rewrites ``pipeline.heartbeat`` of one run every ``interval_s`` from a daemon thread."""

    def __init__(self, uri: str, run_id: str, interval_s: float) -> None:
        self.uri, self.run_id, self.interval_s = uri, run_id, float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self._failing = False

    def start(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.run_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.interval_s))
        self._thread = None

    def _loop(self) -> None:
        from pipeline.tracking.store import client_for

        client = client_for(self.uri)  # its own client: the job's thread keeps its own
        while not self._stop.wait(self.interval_s):
            try:
                self.beat(client)
            except Exception as err:  # a store hiccup: say it once, try again next time
                if not self._failing:
                    log.warning(
                        "heartbeat of run %s failed (%s: %s); retrying", self.run_id, type(err).__name__, err
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("heartbeat of run %s written again", self.run_id)
                self._failing = False

    def beat(self, client) -> None:
        if self._stop.is_set():
            return
        client.set_tag(self.run_id, BEAT, utc_iso())
        self.beats += 1
        run = client.get_run(self.run_id)
        if run.info.status != "RUNNING" and REAPED_AT in run.data.tags and not self._stop.is_set():
            self._revive(client, run)

    def _revive(self, client, run) -> None:
        """Ended by a reaper while alive (its heartbeat looked stale): back to RUNNING, with a note."""
        note = (
            f"ended {run.info.status} by a reaper at {run.data.tags[REAPED_AT]} while its process was alive; "
            f"set RUNNING again at {utc_iso()}"
        )
        client.set_tag(
            self.run_id, "pipeline.revived", f"{note} (the reaper said: {run.data.tags.get(REAPED)})"
        )
        for key in (REAPED, REAPED_AT, REAPED_BY, "error"):  # the reaper's verdict no longer holds
            if key in run.data.tags:
                client.delete_tag(self.run_id, key)
        client.update_run(self.run_id, status="RUNNING")  # last: RUNNING again means the record is clean
        log.warning("run %s: %s", self.run_id, note)
