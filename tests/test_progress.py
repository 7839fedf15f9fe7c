"""Progress bars: shown in a real terminal (a pseudo-terminal here), quiet in CI, pipes and multiruns."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

from pipeline import progress
from pipeline.config.validate import ConfigError, validate
from tests.conftest import REPO, compose_cfg

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
    progress.configure("false")
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
