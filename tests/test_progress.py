"""Progress bars: shown in a real terminal (a pseudo-terminal here), quiet in CI, pipes and multiruns."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from pipeline import progress
from pipeline.config.validate import ConfigError, validate
from tests.conftest import REPO, cli_env, compose_cfg, start_cli

BAR = "%|"  # tqdm draws "NN%|####  |"

COUNT = textwrap.dedent(
    """
    import numpy as np
    from pipeline import progress
    progress.configure({setting!r})
    chunks = [(np.zeros((5, 2)), np.zeros(5))] * 4
    n = sum(len(y) for _, y in progress.samples(iter(chunks), 20, "export"))
    print("counted", n)
    """
)

HYDRA_APP = textwrap.dedent(
    """
    import hydra
    from pipeline import progress

    @hydra.main(version_base="1.3", config_path=None, config_name=None)
    def main(cfg):
        print("bars on" if progress.enabled() else "bars off")

    main()
    """
)


@pytest.fixture(autouse=True)
def _restore_setting():
    yield
    progress.configure("auto")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    return {**env, "PYTHONPATH": str(REPO), "TERM": "xterm", **extra}


def run_in_terminal(args, cwd, env, timeout=120) -> str:
    """Run a command with stdin/stdout/stderr on a pseudo-terminal; return everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 0 columns would hide bars
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=timeout)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_switch_values():
    progress.configure("true")
    assert progress.enabled()
    progress.configure(False)  # YAML booleans work too
    assert not progress.enabled()
    with pytest.raises(ValueError, match="progress='sometimes'"):
        progress.configure("sometimes")


def test_off_returns_the_iterable_itself():
    progress.configure({"bars": "false", "log_every_s": 0})  # no bars, no log lines
    items = [1, 2, 3]
    assert progress.track(items, total=3) is items


def test_bar_in_a_terminal(tmp_path):
    out = run_in_terminal([sys.executable, "-c", COUNT.format(setting="auto")], tmp_path, _env())
    assert "counted 20" in out and "export" in out and BAR in out and "/20" in out


@pytest.mark.parametrize(
    "setting,env,piped",
    [("auto", {"CI": "true"}, False), ("auto", {}, True), ("false", {}, False)],
    ids=["ci", "pipe", "off"],
)
def test_quiet_in_ci_pipes_and_when_off(tmp_path, setting, env, piped):
    args = [sys.executable, "-c", COUNT.format(setting=setting)]
    if piped:
        proc = subprocess.run(
            args, cwd=tmp_path, env=_env(**env), capture_output=True, text=True, timeout=120
        )
        out = proc.stdout + proc.stderr
    else:
        out = run_in_terminal(args, tmp_path, _env(**env))
    assert "counted 20" in out and BAR not in out


def test_forced_on_without_a_terminal(tmp_path):
    args = [sys.executable, "-c", COUNT.format(setting="true")]
    proc = subprocess.run(args, cwd=tmp_path, env=_env(CI="1"), capture_output=True, text=True, timeout=120)
    assert BAR in proc.stderr


def test_quiet_in_a_hydra_multirun_even_in_a_terminal(tmp_path):
    (tmp_path / "app.py").write_text(HYDRA_APP)
    dirs = [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    assert "bars on" in run_in_terminal([sys.executable, "app.py", *dirs], tmp_path, _env())
    out = run_in_terminal([sys.executable, "app.py", "-m", *dirs, "+x=1,2"], tmp_path, _env())
    assert out.count("bars off") == 2 and "bars on" not in out


def test_config_switch_is_validated(tmp_path):
    validate(compose_cfg(tmp_path, ["progress=false"]))
    with pytest.raises(ConfigError, match=r"Invalid config: progress='maybe'"):
        validate(compose_cfg(tmp_path, ["progress=maybe"]))


@pytest.mark.slow
def test_cli_shows_export_and_epoch_bars_in_a_terminal(tmp_path):
    args = [sys.executable, "-m", "pipeline", "trainer.epochs=2"]
    out = run_in_terminal(args, tmp_path, _env(PIPELINE_ROOT=str(tmp_path)), timeout=300)
    assert "export:" in out and "epoch 1/2:" in out and "epoch 2/2:" in out and BAR in out
    assert "epoch 2/2  train loss" in out  # log lines still there, printed above the bars


# ------------------------------------------------------------------------------------------------
# Log lines where bars are off
# ------------------------------------------------------------------------------------------------

EPOCH_LINE = re.compile(
    r"epoch 1/1: (\d+)/(\d+) batches \(\d+%\), (\d+) samples, \d+ samples/s, "
    r"data wait ([\d.]+) s \((\d+)%\), ETA \d+(?: s|m\d\ds)"
)
EXPORT_LINE = re.compile(r"export: (\d+)/200 samples \(\d+%\), \d+ samples/s, [\d.]+ MB/s, ETA \d+ s")


class SlowSamples(torch.utils.data.Dataset):
    """A real map-style dataset whose every sample takes ``delay`` seconds to read."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return torch.zeros(2), i % 3


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


def test_a_long_epoch_logs_lines_with_batches_rate_data_wait_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    progress.configure({"bars": "false", "log_every_s": 0.1})
    loader = torch.utils.data.DataLoader(SlowSamples(40, 0.01), batch_size=4)
    assert sum(len(y) for _, y in progress.batches(loader, "epoch 1/1")) == 40
    lines = _progress_lines(caplog)
    assert lines, "no progress line in a 0.4 s loop logging every 0.1 s"
    for line in lines:
        m = EPOCH_LINE.fullmatch(line)
        assert m, line
        done, total, samples, _, wait_pct = map(float, m.groups())
        assert total == 10 and 0 <= done <= 10 and samples == 4 * done  # logged while the loop ran
        assert wait_pct >= 50  # the loop did nothing but wait for its slow samples
    assert not [t for t in threading.enumerate() if t.name.startswith("progress ")]  # the logger stopped


def test_a_long_export_logs_samples_rate_and_mb_per_s(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    progress.configure({"bars": "false", "log_every_s": 0.1})

    def chunks():
        for _ in range(20):
            time.sleep(0.02)
            yield np.zeros((10, 4), np.float32), np.zeros(10)

    assert sum(len(y) for _, y in progress.samples(chunks(), 200, "export", sample_bytes=16)) == 200
    lines = _progress_lines(caplog)
    assert lines and all(EXPORT_LINE.fullmatch(line) for line in lines), lines


def test_a_short_loop_logs_nothing_extra_and_zero_turns_lines_off(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    progress.configure({"bars": "false", "log_every_s": 30})
    loader = torch.utils.data.DataLoader(SlowSamples(8, 0.0), batch_size=4)
    assert sum(len(y) for _, y in progress.batches(loader, "epoch 1/1")) == 8
    progress.configure({"bars": "false", "log_every_s": 0})
    assert progress.batches(loader, "epoch 1/1") is loader  # no wrapper, no cost
    assert _progress_lines(caplog) == []


def test_progress_node_and_the_old_scalar_form_compose_and_validate(tmp_path):
    for overrides, bars, every in (
        ([], "auto", 30.0),
        (["progress=false"], "false", 30.0),  # the old switch still works on the command line
        (["progress.bars=true", "progress.log_every_s=5"], "true", 5.0),
    ):
        cfg = compose_cfg(tmp_path, overrides)
        validate(cfg)
        progress.configure(cfg.progress)
        assert (progress._setting, progress.log_every_s()) == (bars, every)
    with pytest.raises(ConfigError, match=r"progress.log_every_s=-1"):
        validate(compose_cfg(tmp_path, ["progress.log_every_s=-1"]))
    with pytest.raises(ConfigError, match=r"progress.bars='maybe'"):
        validate(compose_cfg(tmp_path, ["progress.bars=maybe"]))


def test_training_logs_progress_lines_during_its_epoch(tmp_path, caplog):
    """The train loop (pipeline/training/train.py's fit) goes through progress.batches."""
    from pipeline import api

    caplog.set_level(logging.INFO, logger="pipeline.progress")
    overrides = ["storage=npy", "loader.batch_size=4", "progress.bars=false", "progress.log_every_s=0.05"]
    cfg = api.compose_config([f"paths.root={tmp_path}", *overrides, "trainer.epochs=1"], tmp_path / "run")
    exp = api.export_data(cfg)
    train, val = api.make_loaders(cfg, exp, api.split_data(cfg, exp))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is fastest, and steady on a busy machine
    try:
        api.train(cfg, api.make_model(cfg, exp), train, val)
    finally:
        torch.set_num_threads(threads)
    lines = [m for m in map(EPOCH_LINE.fullmatch, _progress_lines(caplog)) if m]
    assert lines, _progress_lines(caplog)
    assert all(int(m.group(2)) == 360 for m in lines)  # 1437 train samples in batches of 4
    assert int(lines[0].group(1)) < 360  # logged while the epoch ran


@pytest.mark.slow
def test_cli_job_with_an_epoch_over_40_s_logs_progress_at_the_default_interval(tmp_path):
    """stdout piped (not a terminal), the default ``progress.log_every_s`` (30 s), an epoch of 400,000
    single-sample batches (minutes on any machine): a progress line comes during the epoch, and once the
    epoch has run for over 40 s the job is stopped with SIGTERM (it ends KILLED, like Ctrl-C)."""
    from pipeline.config.schema import ProgressConfig

    assert ProgressConfig.log_every_s == 30
    args = [
        "storage=memmap",
        "source=synthetic",
        "source.num_samples=500000",
        "source.shape=[8]",
        "loader.batch_size=1",
        "model.hidden=[32]",
        "trainer.epochs=1",
        "tracking.log_model=false",
    ]
    env = cli_env(tmp_path)
    env.pop("CI", None)
    proc = start_cli(tmp_path, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, first = [], None
    try:
        for line in proc.stdout:  # a pipe: progress bars are off
            out.append(line)
            if m := EPOCH_LINE.search(line):
                first = m  # the epoch has run for log_every_s = 30 s
                break
        if first is not None:
            time.sleep(12)  # now > 40 s into the epoch
            proc.send_signal(signal.SIGTERM)
        out.append(proc.communicate(timeout=120)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert first is not None, text[-3000:]
    done, total = int(first.group(1)), int(first.group(2))
    assert total == 400_000 and 0 < done < total, first.group(0)  # logged mid-epoch
    assert "epoch 1/1  train loss" not in text  # the epoch was still running at 42 s
    assert proc.returncode == 128 + signal.SIGTERM
