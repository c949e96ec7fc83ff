"""The CLI: bad input gets one line naming the problem and the fix, exit code 2, and no run left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workbench.cli import main
from workbench.store import RunStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_file(tmp_path, tiny_config):
    def write(**sections):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config(**sections).to_dict()))
        return path

    return write


def _run(capsys, home, *argv):
    code = main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("overrides, match", [
    (["data.source=nowhere/missing.csv"], r"data file 'nowhere/missing.csv' not found"),
    (["data.source={bad_format}"], r"unknown format: use .csv, .tsv, .jsonl or .parquet"),
    (["data.source={empty}"], r"is empty"),
    (["data.source={binary}"], r"not UTF-8 text"),
    (["data.text_column=review"], r"text column 'review' not found: columns found are text, label"),
    (["data.label_column=sentiment"], r"label column 'sentiment' not found: columns found are text, label"),
    (["data.source={one_class}"], r"single label \('x'\)"),
    (["data.source={train_ab}", "data.eval_source={eval_abc}"], r"eval labels \['c'\] never occur in the training"),
    (["model=minilm"], r"model 'minilm' is not in the catalog.*did you mean 'minilm-l6'"),
    (["model=someone/no-such-model-xyz"], r"could not be fetched from the Hugging Face hub.*Offline choices: minilm-l6"),
    (["data.source=bbc"], r"dataset 'bbc' is neither a catalog name.*did you mean 'bbc-news'"),
    (["method.r=0"], r"method.r = 0 is not allowed"),
    (["method.target_modules=[query,qproj]"], r"'qproj' is not a linear layer of this model; valid names: dense, key"),
    (["train.learning_rate=0"], r"train.learning_rate = 0.0 is not allowed"),
    (["train.epochs=0"], r"train.epochs = 0 is not allowed"),
    (["train.batch_size=500"], r"train.batch_size = 500 x 1 process\(es\) is larger than the 72 training rows"),
    (["train.max_length=4096"], r"train.max_length = 4096 is beyond the model's limit of 128 tokens"),
    (["method.name=prefix"], r"method.name = 'prefix' is not allowed: expected one of 'full', 'head-only'"),
    (["train.lr=0.1"], r"unknown config key 'train.lr'"),
    (["method.name=zero-shot-prompt"], r"zero-shot-prompt.*zero-shot-embedding"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, config_file, overrides, match):
    files = {
        "bad_format": (tmp_path / "d.xlsx", b"PK\x03\x04"),
        "empty": (tmp_path / "empty.csv", b""),
        "binary": (tmp_path / "bin.csv", bytes(range(256)) * 8),
        "one_class": (tmp_path / "one.csv", ("text,label\n" + "".join(f"t{i},x\n" for i in range(20))).encode()),
        "train_ab": (tmp_path / "ab.csv", ("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20))).encode()),
        "eval_abc": (tmp_path / "abc.csv", b"text,label\nu1,a\nu2,c\n"),
    }
    for path, content in files.values():
        path.write_bytes(content)
    subs = {k: str(p) for k, (p, _) in files.items()}
    started = time.monotonic()
    code, out, err = _run(capsys, tmp_path / "home", "train", str(config_file()),
                          *[x for o in overrides for x in ("--set", o.format(**subs))])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    import re

    assert re.search(match, lines[0]), lines[0]
    assert RunStore(tmp_path / "home").list() == [], "bad input must not leave a run behind"
    assert time.monotonic() - started < 15, "an offline hub id must fail fast"


def test_train_show_predict_round_trip(tmp_path, capsys, config_file):
    home = tmp_path / "home"
    code, out, err = _run(capsys, home, "train", str(config_file(method={"name": "full"})), "--set", "name=cli-run")
    assert code == 0, err
    assert "completed" in out and "accuracy" in out
    code, out, _ = _run(capsys, home, "runs", "show", "latest", "--json")
    record = json.loads(out)
    for key in ("id", "status", "config", "metrics", "error", "timings"):
        assert key in record
    assert record["status"] == "completed" and record["name"] == "cli-run"
    for key in ("accuracy", "f1_macro", "eval_loss", "labels", "confusion_matrix"):
        assert key in record["metrics"]
    for key in ("samples_per_second", "wall_seconds", "peak_memory_mb"):
        assert record["timings"][key] > 0
    code, out, _ = _run(capsys, home, "runs", "list")
    assert record["id"] in out and "completed" in out
    texts = tmp_path / "texts.txt"
    texts.write_text("great great great film\n\nawful awful awful plot\n")  # blank lines skipped
    code, out, _ = _run(capsys, home, "predict", "latest", "--file", str(texts), "--text", "superb", "--json")
    preds = json.loads(out)
    assert len(preds) == 3 and all(p["label"] in ("neg", "pos") for p in preds)
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 for p in preds)


@pytest.mark.parametrize("method", ["lora", "head-only"])
def test_predictor_reproduces_the_best_evaluation(tmp_path, tiny_config, method):
    """Rebuilding base + saved trainable weights gives exactly the evaluated model."""
    from workbench.predict import load_predictor
    from workbench.loop import train

    store = RunStore(tmp_path / "home")
    # the fine-tuned model alone (a run may answer as an ensemble with its baseline: tests/test_baseline.py)
    record = train(tiny_config(method={"name": method, "dropout": 0.1}, train={"ensemble": "off"}), store=store)
    rows = json.loads(Path(record["metrics"]["predictions_file"]).read_text())["rows"]
    predictor = load_predictor(record["id"], home=store.home, calibrated=False)
    preds = predictor.predict([r["text"] for r in rows])
    assert [p["label"] for p in preds] == [r["predicted"] for r in rows]
    for p, r in zip(preds, rows):
        assert p["scores"][p["label"]] == pytest.approx(r["confidence"], abs=1e-4)


def test_resume_refuses_a_completed_run(tmp_path, capsys, config_file):
    home = tmp_path / "home"
    assert _run(capsys, home, "train", str(config_file(train={"epochs": 1})))[0] == 0
    code, _, err = _run(capsys, home, "train", "--resume", "latest")
    assert code == 2 and "is completed: nothing to resume" in err


def test_runs_show_unknown_and_empty_store(tmp_path, capsys):
    code, _, err = _run(capsys, tmp_path / "home", "runs", "show", "latest")
    assert code == 2 and "no runs yet" in err
    code, _, err = _run(capsys, tmp_path / "home", "runs", "show", "nope")
    assert code == 2 and "no run 'nope'" in err


def test_assets_list_and_inspect(tmp_path, capsys):
    code, out, _ = _run(capsys, tmp_path / "home", "assets", "list", "--json")
    names = {a["name"]: a for a in json.loads(out)}
    assert {"minilm-l6", "smollm2-135m-instruct", "bbc-news", "rotten-tomatoes", "chatterbot"} <= set(names)
    assert names["minilm-l6"]["installed"] and names["bbc-news"]["installed"]
    code, out, _ = _run(capsys, tmp_path / "home", "inspect", "minilm-l6", "--num-labels", "5", "--json")
    info = json.loads(out)
    assert info["architecture"] == "BertModel" and info["context_length"] == 512
    assert 22_000_000 < info["parameters"] < 23_000_000
    assert info["linear_layers"] == ["dense", "key", "query", "value"]
    assert 0 < info["trainable_parameters"] < info["parameters"] and info["memory_estimate_mb"] > 0


def test_the_real_cli_process_exits_2_without_traceback(tmp_path):
    """One end-to-end check through `python -m workbench`, as a user runs it."""
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "workbench", "train", str(ROOT / "configs" / "bbc-lora.yaml"),
                           "--set", "method.r=0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: method.r = 0 is not allowed: a LoRA rank >= 1 (typical: 4, 8, 16)")


def test_core_does_not_import_ui_code():
    code = "import sys, workbench; assert 'torch' not in sys.modules, 'import workbench must stay light'; " \
           "import workbench.cli, workbench.loop, workbench.launch, workbench.predict; " \
           "bad = [m for m in ('ipywidgets', 'plotly', 'widgets', 'IPython') if m in sys.modules]; " \
           "assert not bad, bad; " \
           "assert callable(workbench.launch) and callable(workbench.predict) and callable(workbench.train)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_an_internal_error_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import workbench.cli as cli

    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_runs", boom)
    monkeypatch.delenv("WORKBENCH_DEBUG", raising=False)
    code, out, err = _run(capsys, tmp_path / "home", "runs", "list")
    assert code == 1
    assert err.strip() == ("error: internal error: RuntimeError: something broke (set WORKBENCH_DEBUG=1 for the "
                           "traceback, and please report it)")


def test_importing_bitsandbytes_after_workbench_prints_no_optional_kernel_warning():
    """bitsandbytes warns on import that the optional `kernels` package is missing (it then uses its own CPU
    kernel): the workbench drops that line, and only that line, so every CLI run does not open with it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import workbench, bitsandbytes, logging; "
                          "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr
    assert "another warning" in out.stderr
