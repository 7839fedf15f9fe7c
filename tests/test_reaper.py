"""Runs left RUNNING by dead processes are ended KILLED, saying why; live runs are never touched.

Real processes and a real SQLite store: a small holder process opens a run the way a job does
(heartbeat tags, heartbeat thread) and is SIGKILLed or OOM-killed (a real cgroup); runs "from another
host" are runs whose heartbeat tags name another host. The slow tests kill real ``pipeline`` jobs and a
real multirun mid-epoch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.system import cgroups, processes
from pipeline.tracking import heartbeat as hb
from pipeline.tracking.reaper import reap
from pipeline.tracking.store import prepare_store
from tests.conftest import REPO, sqlite_uri, start_cli

# a process that opens runs as a job (or a sweep launcher) does, prints their ids, then waits
HOLDER = """
import sys, time
from pipeline.tracking.heartbeat import Heartbeat, process_tags
from pipeline.tracking.store import TrackedRun, prepare_store
uri, role, parent, beat_s, extra = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
exp = prepare_store(uri, "pipeline")
tr = TrackedRun(uri, exp, role, parent or None, {"pipeline.role": role, **process_tags(beat_s)}).start()
beats = [Heartbeat(uri, tr.run_id, beat_s).start()]
ids = [tr.run_id]
if extra == "child":  # a sweep launcher running its job in-process (Hydra's basic launcher)
    child = TrackedRun(uri, exp, "job", tr.run_id, {"pipeline.role": "job", **process_tags(beat_s)}).start()
    beats.append(Heartbeat(uri, child.run_id, beat_s).start())
    ids.append(child.run_id)
print(" ".join(ids), flush=True)
if extra == "oom":
    hog = []
    while True:
        hog.append(bytearray(32 << 20))
        for i in range(0, len(hog[-1]), 4096):
            hog[-1][i] = 1
time.sleep(600)
"""
STALE = 300.0


@pytest.fixture
def store(tmp_path):
    uri = sqlite_uri(tmp_path)
    return uri, prepare_store(uri, "pipeline")  # created once, before any holder starts


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


class Holder:
    def __init__(
        self,
        uri: str,
        role: str = "job",
        parent: str = "",
        beat_s: float = 0.2,
        extra: str = "-",
        prefix: list[str] | None = None,
    ) -> None:
        cmd = [*(prefix or []), sys.executable, "-c", HOLDER, uri, role, parent, str(beat_s), extra]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)

    def ids(self) -> list[str]:
        line = self.proc.stdout.readline().split()
        assert line, self.proc.stderr.read()[-3000:]
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def holders():
    started: list[Holder] = []
    yield started
    for h in started:
        h.kill()


def _run(client, uri, tags: dict, name: str = "job", parent: str | None = None):
    exp = client.get_experiment_by_name("pipeline").experiment_id
    if parent:
        tags = {**tags, "mlflow.parentRunId": parent}
    return client.create_run(exp, run_name=name, tags={"pipeline.role": "job", **tags}).info.run_id


def _elsewhere(age_s: float, interval_s: float = 30.0) -> dict:
    """Heartbeat tags of a job on another machine whose last beat is ``age_s`` old."""
    return {
        hb.HOST: "node-17.cluster",
        hb.HOST_ID: "boot=0f0f0f0f-0000-4000-8000-000000000017 pid:[4026531836]",
        hb.PID: "4242",
        hb.PID_START: f"{time.time() - 3600:.3f}",
        hb.BEAT: hb.utc_iso(time.time() - age_s),
        hb.INTERVAL: f"{interval_s:g}",
    }


def test_killed_job_is_ended_killed_with_its_reason_and_a_live_one_is_untouched(store, holders):
    uri, exp = store
    holders += [Holder(uri), Holder(uri)]
    (victim,), (live,) = holders[0].ids(), holders[1].ids()
    client = _client(uri)
    first_beat = client.get_run(live).data.tags[hb.BEAT]
    pid = holders[0].proc.pid
    holders[0].kill()

    ended = reap(uri, exp, STALE)

    assert [run_id for run_id, _ in ended] == [victim]
    run = client.get_run(victim)
    tags = run.data.tags
    assert run.info.status == "KILLED"
    assert tags[hb.REAPED].startswith("process gone: ") and f"pid {pid} on " in tags[hb.REAPED]
    assert tags["error"] == tags[hb.REAPED]
    assert abs(hb.parse_iso(tags[hb.REAPED_AT]) - time.time()) < 60
    assert tags[hb.REAPED_BY] == f"pid {os.getpid()} on {processes.identity().host}"
    last_beat = max(
        1000 * hb.parse_iso(tags[hb.BEAT]), run.info.start_time
    )  # the first beat precedes the run
    assert run.info.end_time == pytest.approx(last_beat, abs=2)  # ended at its last sign of life
    # the live one: untouched, and its heartbeat thread keeps writing
    assert client.get_run(live).info.status == "RUNNING"
    deadline = time.monotonic() + 30
    while client.get_run(live).data.tags[hb.BEAT] == first_beat:
        assert time.monotonic() < deadline, "no heartbeat from the live holder"
        time.sleep(0.1)
    assert reap(uri, exp, STALE) == []  # nothing more to do: the live run stays RUNNING
    assert client.get_run(live).info.status == "RUNNING"


def test_a_pid_that_now_runs_another_process_is_dead_and_this_live_process_is_not(store):
    uri, exp = store
    client = _client(uri)
    mine = hb.process_tags(30.0)  # this very test process: alive
    reused = {**mine, hb.PID_START: f"{float(mine[hb.PID_START]) - 1000:.3f}"}  # same pid, older start
    alive, dead = _run(client, uri, mine), _run(client, uri, reused)
    ended = dict(reap(uri, exp, STALE))
    assert set(ended) == {dead} and "now belongs to another process" in ended[dead]
    assert client.get_run(alive).info.status == "RUNNING"


def test_another_hosts_run_is_ended_only_once_its_heartbeat_is_stale(store):
    uri, exp = store
    client = _client(uri)
    stale = _run(client, uri, _elsewhere(age_s=1000))
    fresh = _run(client, uri, _elsewhere(age_s=10))
    slow_beat = _run(client, uri, _elsewhere(age_s=400, interval_s=200))  # stale after 3 x 200 s
    legacy = _run(client, uri, {})  # no heartbeat tags (older code, other tools): cannot be judged
    ended = dict(reap(uri, exp, STALE))
    assert set(ended) == {stale}
    assert "no heartbeat from pid 4242 on node-17.cluster for 1000 s" in ended[stale]
    for run_id in (fresh, slow_beat, legacy):
        assert client.get_run(run_id).info.status == "RUNNING"


def test_same_host_name_in_another_pid_namespace_is_judged_by_heartbeat(store):
    """A container sharing the host's name (``--network host``): its pid means nothing here."""
    uri, exp = store
    client = _client(uri)
    tags = {**_elsewhere(age_s=10), hb.HOST: processes.identity().host, hb.PID: "999999"}
    other_ns = _run(client, uri, tags)
    assert reap(uri, exp, STALE) == []
    assert client.get_run(other_ns).info.status == "RUNNING"


def test_sweep_parent_is_ended_once_its_launcher_and_all_its_jobs_are_gone(store, holders):
    uri, exp = store
    holders.append(Holder(uri, role="sweep", extra="child"))  # launcher + an in-process job
    parent, child = holders[0].ids()
    holders.append(Holder(uri, parent=parent))  # a job of the same sweep in its own process (joblib)
    (remote,) = holders[1].ids()
    client = _client(uri)
    holders[0].kill()

    ended = dict(reap(uri, exp, STALE))  # the launcher is gone, one job still runs: parent stays
    assert set(ended) == {child}
    assert client.get_run(parent).info.status == "RUNNING"
    assert client.get_run(remote).info.status == "RUNNING"

    holders[1].kill()
    ended = dict(reap(uri, exp, STALE))
    assert set(ended) == {parent, remote}
    assert ended[parent].startswith("sweep launcher gone, and none of its jobs runs: process gone")
    assert {client.get_run(r).info.status for r in (parent, child, remote)} == {"KILLED"}


def test_a_reaped_run_whose_process_is_alive_is_put_back_to_running(store, holders):
    """A host suspended past the staleness comes back: its heartbeat undoes the reaper's verdict."""
    from pipeline.tracking.reaper import end_killed

    uri, _ = store
    holders.append(Holder(uri, beat_s=0.2))
    (run_id,) = holders[0].ids()
    client = _client(uri)
    end_killed(client, client.get_run(run_id), "process gone: (a wrong verdict, for the test)")
    deadline = time.monotonic() + 30
    while client.get_run(run_id).info.status != "RUNNING":
        assert time.monotonic() < deadline, "the live holder never revived its run"
        time.sleep(0.1)
    tags = client.get_run(run_id).data.tags
    assert "while its process was alive" in tags["pipeline.revived"]
    assert "error" not in tags and hb.REAPED_AT not in tags


def test_runs_command_marks_a_dead_running_run_and_reap_ends_it(store, capsys):
    from pipeline.runs.listing import DEAD_MARK
    from pipeline.runs.listing import main as runs_main

    uri, _ = store
    client = _client(uri)
    dead = _run(client, uri, _elsewhere(age_s=1000), name="lost-on-node-17")
    alive = _run(client, uri, hb.process_tags(30.0), name="this-process")
    assert runs_main(["--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"RUNNING{DEAD_MARK}  lost-on-node-17" in out and "RUNNING   this-process" in out
    assert f"{DEAD_MARK} {dead[:8]}: process gone: no heartbeat from pid 4242" in out
    assert runs_main(["--tracking-uri", uri, "--reap"]) == 0
    assert f"ended {dead} KILLED" in capsys.readouterr().out
    assert (client.get_run(dead).info.status, client.get_run(alive).info.status) == ("KILLED", "RUNNING")


@pytest.mark.parametrize(
    "override, message",
    [
        ("tracking.heartbeat_s=0", "tracking.heartbeat_s=0.0 -- seconds > 0"),
        (
            "tracking.stale_after_s=45",
            "tracking.stale_after_s=45.0 -- seconds >= 2 x tracking.heartbeat_s (60)",
        ),
    ],
)
def test_heartbeat_settings_are_checked_naming_the_key(tmp_path, override, message):
    from pipeline.config.validate import ConfigError, validate
    from tests.conftest import compose_cfg

    validate(compose_cfg(tmp_path, ["tracking.heartbeat_s=5", "tracking.stale_after_s=10"]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg(tmp_path, [override]))


def test_an_oom_killed_job_is_ended_naming_the_oom_killer(store, holders):
    from pipeline.system.cgroups import CgroupUnavailable, MemoryCgroup

    uri, exp = store
    try:  # room for the holder's imports (~200 MB), not for its hog
        group = MemoryCgroup(600 << 20, prefix="runs-watch-oom", join=False).__enter__()
    except CgroupUnavailable as err:
        pytest.skip(f"no memory cgroup: {err}")
    try:
        enter = f'echo $$ > {group.path}/cgroup.procs && exec "$@"'  # in the group from its first line
        holders.append(Holder(uri, extra="oom", prefix=["sh", "-c", enter, "sh"]))
        (victim,) = holders[0].ids()
        assert holders[0].proc.wait(timeout=120) == -signal.SIGKILL
        assert cgroups.oom_kills(group.path) >= 1
        assert _client(uri).get_run(victim).data.tags[hb.CGROUP] == str(group.path)
        ended = dict(reap(uri, exp, STALE))
        assert set(ended) == {victim}
        assert "OOM killer" in ended[victim], ended[victim]
    finally:
        for h in holders:
            h.kill()
        group.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------
# Real pipeline jobs (slow)
# ------------------------------------------------------------------------------------------------

LONG = ["trainer.epochs=200", "loader.batch_size=4", "tracking.log_model=false", "progress.log_every_s=0.5"]


def _job(root: Path, name: str, *overrides: str) -> subprocess.Popen:
    where = f"hydra.sweep.dir={root}/{name}" if "-m" in overrides else f"hydra.run.dir={root}/{name}"
    out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return start_cli(root, *overrides, where, **out, start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return line
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s"
    raise AssertionError(f"the process ended without {needle!r}: {''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_job_sigkilled_mid_epoch_is_ended_by_the_next_job_while_a_live_job_finishes(tmp_path):
    from tests.run_helpers import run_id_for

    uri = sqlite_uri(tmp_path)
    prepare_store(uri, "pipeline")
    victim = _job(tmp_path, "victim", *LONG)
    live = _job(tmp_path, "live", "trainer.epochs=4", "loader.batch_size=2", *LONG[2:])
    line = _wait_for_line(victim, "epoch 1/200: ")  # a progress line: the victim is mid-epoch
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    client = _client(uri)
    victim_id = run_id_for(tmp_path, tmp_path / "victim")
    assert client.get_run(victim_id).info.status == "RUNNING", line  # nothing ran after the SIGKILL

    _wait_for_line(live, "epoch 1/4")  # the live job is training too (a progress line or the epoch's end)
    nxt = _job(tmp_path, "next", "trainer.epochs=1", "tracking.log_model=false")
    out = nxt.communicate(timeout=600)[0]
    assert nxt.returncode == 0, out[-3000:]
    run = client.get_run(victim_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[hb.REAPED].startswith("process gone: pid ")
    assert f"ended KILLED ({run.data.tags[hb.REAPED]})" in out  # the next job says what it did

    rest = live.communicate(timeout=600)[0]
    assert live.returncode == 0, rest[-3000:]
    live_run = client.get_run(run_id_for(tmp_path, tmp_path / "live"))
    next_run = client.get_run(run_id_for(tmp_path, tmp_path / "next"))
    assert live_run.info.end_time > next_run.info.start_time  # it ran beside the next job's reaper
    assert live_run.info.status == "FINISHED" and hb.REAPED not in live_run.data.tags


@pytest.mark.slow
def test_sweep_killed_mid_epoch_leaves_nothing_running_after_the_next_start(tmp_path):
    uri = sqlite_uri(tmp_path)
    prepare_store(uri, "pipeline")
    sweep = _job(tmp_path, "sweep", "-m", "loader.batch_size=4,8", *LONG[:1], *LONG[2:])
    _wait_for_line(sweep, "epoch 1/200")  # a progress line, or the epoch's end where it took < 0.5 s
    os.killpg(sweep.pid, signal.SIGKILL)  # the launcher and its in-process job
    sweep.wait(timeout=60)
    client = _client(uri)
    exp = client.get_experiment_by_name("pipeline").experiment_id
    runs = client.search_runs([exp])
    assert {r.data.tags["pipeline.role"]: r.info.status for r in runs} == {
        "sweep": "RUNNING",
        "job": "RUNNING",
    }

    ended = dict(reap(uri, exp, STALE))  # what the next job or sweep does first
    assert set(ended) == {r.info.run_id for r in runs}
    assert {r.info.status for r in client.search_runs([exp])} == {"KILLED"}
