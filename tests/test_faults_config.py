"""Faults in a config file, as a security probe tried them: a YAML alias bomb, an empty file, a file that is
not YAML at all, and values too long to echo. Each ends with exit 2 and one short line, fast, naming the file
and never printing its content."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.config import Config, MAX_SHOWN_CHARS
from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parent.parent


def alias_bomb(levels: int) -> str:
    """The "billion laughs" shape inside method.target_modules: each level lists the previous one 9 times."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nmethod:\n  target_modules: *a{levels}\n"


def cli(args: list[str], home: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "workbench", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("case", ["alias-bomb", "empty"])
def test_bad_config_exits_2_fast_with_a_short_message(tmp_path, case):
    path = tmp_path / "c.yaml"
    path.write_text(alias_bomb(8) if case == "alias-bomb" else "")
    done, seconds = cli(["train", str(path)], tmp_path / "home")
    assert done.returncode == 2, done.stderr[-2000:]
    assert seconds < 5 + 10, seconds  # the 5 s, plus the interpreter's start under a loaded machine
    assert len(done.stderr) < 2048 and "Traceback" not in done.stderr
    assert ("aliases" if case == "alias-bomb" else "is empty") in done.stderr
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())


def test_an_alias_in_an_override_is_refused_too():
    with pytest.raises(WorkbenchError, match="aliases"):
        Config().with_overrides(["method.target_modules=[&x query, *x]"])


def test_a_file_that_is_not_yaml_is_named_without_its_content(tmp_path):
    secret = "root:$6$Zm9vYmFyYmF6$c2VjcmV0aGFzaA:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    shadow = tmp_path / "shadow"
    shadow.write_text(secret)
    with pytest.raises(WorkbenchError, match="is not a YAML config") as info:
        Config.load(shadow)
    assert "root" not in str(info.value).replace(str(tmp_path), "") and "$6$" not in str(info.value)
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(WorkbenchError, match="not UTF-8") as info:
        Config.load(binary)
    assert len(str(info.value)) < 400


def test_a_mapping_of_unknown_keys_is_not_a_config(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("password: hunter2\nuser: alice\n")
    with pytest.raises(WorkbenchError, match="none of its 2 top-level keys") as info:
        Config.load(path)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("raw", [
    {"model": "minilm-l6", "method": {"r": "x" * 100_000}},
    {"model": "minilm-l6", "train": {"epochs": [1] * 50_000}},
    {"model": "minilm-l6", "x" * 100_000: 1},
    {"model": "minilm-l6", "data": "y" * 100_000},
])
def test_values_echoed_in_errors_are_cut(raw):
    with pytest.raises(WorkbenchError) as info:
        Config.from_dict(raw)
    assert len(str(info.value)) < MAX_SHOWN_CHARS + 400, len(str(info.value))


def test_a_huge_config_file_is_refused_by_size(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("model: minilm-l6\n" + "# padding\n" * 200_000)
    with pytest.raises(WorkbenchError, match="more than a config's limit"):
        Config.load(path)


def test_launched_run_and_ladder_logs_are_owner_only(tmp_path):
    """A launched run's log.txt and a ladder's folder and log may quote user data: 0600 / 0700."""
    import os
    import stat

    from workbench.ladder import create_ladder, launch_ladder

    home = tmp_path / "home"
    config = Config.from_dict({"model": "minilm-l6", "data": {"source": "rotten-tomatoes", "max_train_samples": 40,
                                                               "max_eval_samples": 20},
                               "track": {"wandb": "disabled", "tensorboard": False}})
    try:
        lid = create_ladder(config, ["head-only"], home)
    except WorkbenchError as exc:
        pytest.skip(f"catalog not installed: {exc}")
    from workbench.ladder import ladder_dir

    directory = ladder_dir(lid, home)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    process = launch_ladder(lid, home)
    process.terminate()
    process.wait(timeout=60)
    assert stat.S_IMODE(os.stat(directory / "log.txt").st_mode) == 0o600
