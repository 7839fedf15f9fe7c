"""End the MLflow runs that a dead process left RUNNING (a SIGKILL, the OOM killer, a lost node).

    from pipeline.tracking.reaper import reap, verdict
    ended = reap(uri, experiment_id, stale_after_s=300)    # [(run_id, reason), ...]; logs each one
    verdict(run, stale_after_s=300)                         # why ``run`` is dead, or None (alive/unknown)

Every job (recorder.py) and every sweep (sweep.py) calls ``reap`` on its experiment when it starts.
A RUNNING run is judged from the tags its heartbeat (heartbeat.py) wrote:

- recorded on this host (same host name, boot and pid namespace): dead when its pid no longer runs,
  or runs another process (a start time other than the recorded one);
- recorded elsewhere: dead when its heartbeat is older than ``stale_after_s`` (and than three of its
  own heartbeat intervals). Hosts' clocks must agree to well within that (NTP);
- without heartbeat tags (runs of older code or other tools): never touched.

A dead run is ended KILLED, its end time set to its last heartbeat, with the tags ``pipeline.reaped``
(why), ``pipeline.reaped_at`` (when, UTC), ``pipeline.reaped_by`` (which process) and ``error`` (the
same reason, like any failed run). The reason names the cause where it can be told: the kernel log's
OOM-kill line for that pid, or more OOM kills in the job's memory cgroup than when it started;
otherwise "process gone". A sweep's parent run is ended once its launching process is dead and none
of its jobs still runs. A live run is never touched; one that is checked again just before it is
ended and found alive (or finished) is left alone.
"""

from __future__ import annotations

import logging
import time

from pipeline.system import cgroups, processes
from pipeline.tracking import heartbeat as hb

log = logging.getLogger(__name__)

ROLE, SWEEP = "pipeline.role", "sweep"
PARENT = "mlflow.parentRunId"


def _same_host(tags: dict, me: processes.Identity) -> bool:
    return tags.get(hb.HOST) == me.host and tags.get(hb.HOST_ID) == me.host_id


def _cause(tags: dict, pid: int, start: float) -> str:
    line = processes.kernel_oom_kill(pid, start)
    if line:
        return f"killed by the kernel's OOM killer ({line})"
    group, before = tags.get(hb.CGROUP), tags.get(hb.CGROUP_OOM)
    now = cgroups.oom_kills(group) if group and before is not None else None
    if now is not None and now > int(before):
        return (
            f"killed by the OOM killer, most likely: its memory cgroup {group} counted "
            f"{now - int(before)} OOM kill(s) since the job started"
        )
    return "process gone"


def verdict(run, stale_after_s: float, me: processes.Identity | None = None, now: float | None = None):
    """Why this RUNNING run's process is dead, or None when it is alive or cannot be judged."""
    tags = run.data.tags
    if run.info.status != "RUNNING" or hb.PID not in tags or hb.BEAT not in tags:
        return None
    me = me or processes.identity()
    now = time.time() if now is None else now
    pid, host, beat = int(tags[hb.PID]), tags.get(hb.HOST, "?"), tags[hb.BEAT]
    start = float(tags.get(hb.PID_START, "0"))
    if _same_host(tags, me):
        found = processes.state(pid, start)
        if found == processes.RUNNING:
            return None
        if found == processes.OTHER:
            return f"process gone: pid {pid} on {host} now belongs to another process (last heartbeat {beat})"
        return f"{_cause(tags, pid, start)}: pid {pid} on {host} no longer runs (last heartbeat {beat})"
    last = hb.parse_iso(beat)
    limit = max(stale_after_s, 3 * float(tags.get(hb.INTERVAL, "0") or 0))
    if last is None or now - last <= limit:
        return None
    return (
        f"process gone: no heartbeat from pid {pid} on {host} for {now - last:.0f} s "
        f"(stale after {limit:.0f} s; last heartbeat {beat})"
    )


def _running(client, experiment_id: str, extra: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'RUNNING'" + extra,
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def end_killed(client, run, reason: str, me: processes.Identity | None = None) -> None:
    """End ``run`` KILLED with the reaper's tags; its end time is its last heartbeat (else now)."""
    me = me or processes.identity()
    last = hb.parse_iso(run.data.tags.get(hb.BEAT, ""))
    end_ms = int(1000 * (last if last is not None else time.time()))
    tags = {
        hb.REAPED: reason,
        hb.REAPED_AT: hb.utc_iso(),
        hb.REAPED_BY: f"pid {me.pid} on {me.host}",
        "error": reason,
    }
    from mlflow.entities import RunTag

    client.log_batch(run.info.run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
    client.set_terminated(run.info.run_id, status="KILLED", end_time=max(end_ms, run.info.start_time or 0))


def _still_dead(client, run, stale_after_s: float, me) -> tuple:
    """Judge the run again from a fresh read, just before ending it: on this host the process is
    already gone, so whatever it wrote last is in the store by now."""
    fresh = client.get_run(run.info.run_id)
    return verdict(fresh, stale_after_s, me), fresh  # (reason or None, the run as read now)


def reap(uri: str, experiment_id: str, stale_after_s: float) -> list[tuple[str, str]]:
    """End the runs of ``experiment_id`` whose process is dead; return ``[(run_id, reason), ...]``."""
    from pipeline.tracking.store import client_for

    client = client_for(uri)
    me = processes.identity()
    ended = []
    runs = _running(client, experiment_id)
    jobs = [r for r in runs if r.data.tags.get(ROLE) != SWEEP]
    sweeps = [r for r in runs if r.data.tags.get(ROLE) == SWEEP]
    for run in jobs:
        if verdict(run, stale_after_s, me) is None:
            continue
        reason, fresh = _still_dead(client, run, stale_after_s, me)
        if reason is not None:
            end_killed(client, fresh, reason, me)
            ended.append((run.info.run_id, reason))
    for parent in sweeps:
        if verdict(parent, stale_after_s, me) is None:
            continue
        pid = parent.info.run_id
        if _running(client, experiment_id, f" and tags.`{PARENT}` = '{pid}'"):
            continue  # its launcher is gone, but some of its jobs still run (e.g. on a cluster)
        why, fresh = _still_dead(client, parent, stale_after_s, me)
        if why is not None:
            reason = f"sweep launcher gone, and none of its jobs runs: {why}"
            end_killed(client, fresh, reason, me)
            ended.append((pid, reason))
    for run_id, reason in ended:
        log.warning("MLflow run %s was left RUNNING by a dead process: ended KILLED (%s)", run_id, reason)
    return ended


def reap_quietly(uri: str, experiment_id: str, stale_after_s: float) -> list[tuple[str, str]]:
    """``reap``, but a failure only logs a warning: cleaning up after others never stops a job."""
    try:
        return reap(uri, experiment_id, stale_after_s)
    except Exception as err:
        log.warning(
            "could not check for runs left RUNNING by dead processes: %s: %s", type(err).__name__, err
        )
        return []
