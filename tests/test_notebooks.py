"""The teaching notebooks run top to bottom under `pytest --nbval-lax`, and are committed without outputs.

Each notebook runs in its own `python -m pytest --nbval-lax` process with its own run store, from a copy
in a folder of its own: the kernel's working directory is not notebooks/, so `import course` is proven to
work from anywhere. By default they run in "smoke" scale on tiny models (the BERT from conftest; for the
chat lab a 2-layer Llama with a word-level tokenizer of the ChatterBot corpus's words): seconds of training
on the catalog data. WORKBENCH_NOTEBOOKS_COURSE=1 runs them as students do (the catalog's MiniLM and
SmolLM2-135M-Instruct, course sizes, < 5 min each).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TEACHING = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
ALL = TEACHING + ["dashboard.ipynb"]
COURSE = os.environ.get("WORKBENCH_NOTEBOOKS_COURSE", "").lower() in ("1", "true", "yes")
BUDGET_S = 300  # a student's notebook must finish within 5 minutes on 2 CPU cores
CHAT_NOTEBOOKS = {"07_chat_tuning.ipynb"}  # task chat: a causal LM with a chat template
BOOTSTRAP = 'sys.path.insert(0, str(Path(workbench.__file__).resolve().parents[1] / "notebooks"))'


def _course_module():
    spec = importlib.util.spec_from_file_location("course", NOTEBOOKS / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(name: str) -> list[str]:
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_teaching_notebooks_exist():
    assert {"01_quickstart.ipynb", "02_full_vs_lora_vs_qlora.ipynb", "03_overfitting_and_schedules.ipynb",
            "04_your_own_data.ipynb", "05_method_ladder.ipynb", "06_deploy.ipynb", "07_chat_tuning.ipynb",
            "08_text_regression.ipynb", "09_named_entities.ipynb"} <= set(TEACHING)


@pytest.mark.parametrize("name", TEACHING)
def test_notebook_finds_course_from_any_working_directory(name, tmp_path):
    """The first code cell puts notebooks/ on sys.path (from the installed workbench) before `import course`;
    run from another folder, it imports this repository's course.py."""
    first = _code_cells(name)[0]
    assert BOOTSTRAP in first and first.index(BOOTSTRAP) < first.index("import course"), \
        f"{name}: the first code cell must put notebooks/ on sys.path before `import course`"
    setup = first[: first.index("import course")] + "import course\nprint(course.__file__)\n"
    proc = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == NOTEBOOKS / "course.py"


def _private_imports(source: str) -> list[str]:
    """`_private` modules or names imported by the code (`__future__` aside)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            parts = (node.module or "").split(".")
            if any(p.startswith("_") for p in parts):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


@pytest.mark.parametrize("name", ALL + sorted(p.name for p in NOTEBOOKS.glob("*.py")))
def test_notebooks_import_no_private_module_or_name(name):
    path = NOTEBOOKS / name
    sources = _code_cells(name) if name.endswith(".ipynb") else [path.read_text(encoding="utf-8")]
    private = [m for src in sources for m in _private_imports(src)]
    assert not private, f"{name} imports private code {private}: use the public names of workbench and widgets"


def test_private_imports_are_found():
    assert _private_imports("from widgets._style import full_width\nimport workbench._x\n"
                            "from workbench.chat import _as_messages\nfrom __future__ import annotations") == [
        "widgets._style", "workbench._x", "workbench.chat._as_messages"]
    assert _private_imports("import course\nfrom widgets import Dashboard") == []


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_committed_short_and_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown", f"{name} should open with a markdown introduction"
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{name} cell {i} has outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"
            assert len("".join(cell["source"]).splitlines()) <= 25, f"{name} cell {i} is long: move code to the library"
    assert sum(c["cell_type"] == "code" for c in cells) <= 12, f"{name} has many code cells: keep notebooks short"


def test_check_answer_passes_right_answers_skips_none_and_explains_wrong_ones(capsys):
    course = _course_module()
    course.check_answer("q", None, 3, hint="add the diagonal")
    assert "not answered yet" in capsys.readouterr().out
    course.check_answer("q", 3, 3)
    course.check_answer("q", 0.504, 0.5, tolerance=0.01)
    course.check_answer("q", " Tech ", "tech")
    assert capsys.readouterr().out.count("correct") == 3
    with pytest.raises(course.WrongAnswer, match=r"\[q\] 4 is not right\. add the diagonal"):
        course.check_answer("q", 4, 3, hint="add the diagonal")
    course.check_choice("q", "LoRA", ["lora", "qlora"])
    with pytest.raises(course.WrongAnswer, match="'full' is not right"):
        course.check_choice("q", "full", ["lora", "qlora"])


def test_course_chat_config_and_chat_tables(monkeypatch):
    monkeypatch.setenv("WORKBENCH_COURSE_SCALE", "smoke")
    monkeypatch.delenv("WORKBENCH_COURSE_CHAT_MODEL", raising=False)
    course = _course_module()
    config = course.chat_config("c", system_prompt="Be brief.", train={"epochs": 3})
    assert (config.task, config.model, config.method.name) == ("chat", "smollm2-135m-instruct", "lora")
    assert (config.chat.system_prompt, config.chat.eval_at_start, config.train.epochs) == ("Be brief.", True, 3)
    assert config.data.max_train_samples == course.CHAT_SIZES["smoke"]["max_train_samples"]
    points = [{"kind": "train", "step": 1, "loss": 3.0},
              {"kind": "eval", "step": 0, "eval_loss": 3.2, "perplexity": 24.53, "samples": [
                  {"question": "Hi", "reference": "Hello", "answer": "Hey"}]},
              {"kind": "eval", "step": 4, "eval_loss": 2.5, "perplexity": 12.18, "samples": []}]
    table = course.eval_table(points)
    assert list(table.index) == [0, 4] and table.loc[4, "perplexity"] == 12.18
    assert course.samples(points[1]).to_dict("records") == [{"question": "Hi", "reference": "Hello", "answer": "Hey"}]
    assert course.conversation("q", "a", "s") == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]
    assert course.conversation("q") == [{"role": "user", "content": "q"}]


def test_course_regression_config_split_scores_and_tables(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_COURSE_SCALE", "smoke")
    course = _course_module()
    config = course.regression_config("r", method="head-only", train={"learning_rate": 5e-3})
    assert (config.task, config.method.name, config.train.learning_rate) == ("text-regression", "head-only", 5e-3)
    assert config.train.threads == 1  # 2 threads on 2 shared cores ran LoRA 6-10x slower
    assert (config.data.source, config.data.max_train_samples) == (
        "movie-ratings", course.REGRESSION_SIZES["smoke"]["max_train_samples"])
    csv = tmp_path / "scores.csv"
    csv.write_text("text,rating\n" + "".join(f"sentence {i},{i % 9 - 4}\n" for i in range(40)), encoding="utf-8")
    train, held = course.regression_split(course.regression_config("r", source=str(csv)))
    assert (len(train), len(held)) == (32, 8) and set(train["text"]).isdisjoint(held["text"])
    assert sorted(train["value"].tolist() + held["value"].tolist()) == sorted(i % 9 - 4 for i in range(40))
    # a perfect order shifted by 2: Spearman 1, RMSE and MAE exactly the shift
    shifted = course.regression_scores([1, 2, 3, 4], [3, 4, 5, 6])
    assert shifted == pytest.approx({"RMSE": 2.0, "MAE": 2.0, "Pearson": 1.0, "Spearman": 1.0})
    reversed_ = course.regression_scores([1, 2, 3, 4], [4, 3, 2, 1])
    assert reversed_["Spearman"] == pytest.approx(-1.0) and reversed_["RMSE"] == pytest.approx(5 ** 0.5)
    assert math.isnan(course.regression_scores([1, 2, 3], [2, 2, 2])["Spearman"])  # a constant has no ranks
    table = course.scores_table([1, 2, 3, 4], {"shifted": [3, 4, 5, 6], "exact": [1, 2, 3, 4]})
    assert list(table.index) == ["shifted", "exact"] and table.loc["exact", "RMSE"] == 0.0
    predictions = tmp_path / "step-4.json"
    predictions.write_text(json.dumps({"rows": [{"index": 0, "text": "a", "true": 1.0, "predicted": 1.5},
                                                {"index": 1, "text": "b", "true": -2.0, "predicted": -1.0}]}))
    record = {"config": {"method": {"name": "lora"}}, "status": "completed", "info": {"trainable_params": 10},
              "timings": {"train_seconds": 3.0}, "metrics": {"rmse": 0.79, "baseline_rmse": 1.5, "mae": 0.75,
                                                             "spearman": 1.0, "pearson": 1.0, "r2": 0.72,
                                                             "predictions_file": str(predictions)}}
    assert course.regression_predictions(record)["error"].tolist() == [0.5, 1.0]
    row = course.regression_table([record]).loc["lora"]
    assert (row["rmse"], row["baseline_rmse"], row["trainable params"]) == (0.79, 1.5, 10)


def test_course_ner_config_split_and_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_COURSE_SCALE", "smoke")
    course = _course_module()
    config = course.ner_config("n", train={"epochs": 2})
    assert (config.task, config.method.name, config.data.source) == ("token-classification", "full", "wnut-16")
    assert (config.train.epochs, config.train.threads, config.train.learning_rate) == (2, 1, 2e-4)
    assert course.ner_config("n", method="lora").train.learning_rate is None  # LoRA's own default rate
    assert config.data.max_train_samples == course.NER_SIZES["smoke"]["max_train_samples"]
    conll = tmp_path / "tweets.conll"
    sentences = [f"Alice\tB-person\nmet\tO\nBob\tB-person\nin\tO\nNew\tB-geo-loc\nYork\tI-geo-loc\n{i}\tO\n"
                 for i in range(10)]
    conll.write_text("\n".join(sentences), encoding="utf-8")
    train, held = course.ner_split(course.ner_config("n", source=str(conll)))
    assert (len(train), len(held)) == (8, 2) and set(train["text"]).isdisjoint(held["text"])
    row = train.iloc[0]
    assert row["text"].startswith("Alice met Bob in New York ") and row["tags"][:2] == ["B-person", "O"]
    assert row["entities"] == [("person", "Alice"), ("person", "Bob"), ("geo-loc", "New York")]
    counts = course.entity_counts(train, held)
    assert list(counts.index) == ["person", "geo-loc"]
    assert counts.loc["person"].tolist() == [16, 4] and counts.loc["geo-loc"].tolist() == [8, 2]


def test_course_ner_figures_missed_entities_and_spans(tmp_path):
    from workbench.run_paths import RunPaths

    course = _course_module()
    run = RunPaths(tmp_path / "run")
    run.eval.mkdir(parents=True)
    text = "Alice met Bob in New York"
    gold = [{"type": "person", "start": 0, "end": 5, "text": "Alice"}, {"type": "person", "start": 10, "end": 13,
             "text": "Bob"}, {"type": "geo-loc", "start": 17, "end": 25, "text": "New York"}]
    predicted = [{"type": "person", "start": 0, "end": 5, "text": "Alice"},
                 {"type": "geo-loc", "start": 21, "end": 25, "text": "York"}]
    other = {"index": 1, "text": "Paris", "gold_spans": [{"type": "geo-loc", "start": 0, "end": 5, "text": "Paris"}],
             "predicted_spans": [{"type": "person", "start": 0, "end": 5, "text": "Paris"}]}
    run.eval_step(4).write_text(json.dumps({"step": 4, "rows": [
        {"index": 0, "text": text, "gold_spans": gold, "predicted_spans": predicted}, other]}), encoding="utf-8")
    record = {"dir": str(run.root), "info": {"train_entity_counts": {"person": 30, "geo-loc": 12}},
              "metrics": {"step": 4, "f1": 0.4, "per_type": {
                  "geo-loc": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2},
                  "person": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}}}}
    figures = course.per_type_table(record)
    assert list(figures.index) == ["person", "geo-loc"]  # most support, then most training entities first
    assert figures.loc["person"].tolist() == [0.5, 0.5, 0.5, 2, 30]
    missed = course.missed_entities(record)
    assert missed[["sentence", "type", "entity", "model said"]].values.tolist() == [
        [0, "person", "Bob", "nothing"], [0, "geo-loc", "New York", "wrong ends: 'York' (geo-loc)"],
        [1, "geo-loc", "Paris", "wrong type: person"]]
    # what the per-type recall counts: support * (1 - recall) missed
    assert (missed["type"] == "person").sum() == round(2 * (1 - figures.loc["person", "recall"]))
    spans = course.entity_spans([{"text": text, "entities": [{**predicted[0], "score": 0.91234}]},
                                 {"text": "nothing here", "entities": []}])
    assert spans[["type", "entity", "start", "end", "score"]].values.tolist() == [["person", "Alice", 0, 5, 0.912]]


@pytest.mark.integration
@pytest.mark.timeout(BUDGET_S + 120)
@pytest.mark.parametrize("name", TEACHING)
def test_notebook_runs_top_to_bottom(name, tiny_model_dir, request, tmp_path):
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path / "runs"), "WANDB_MODE": "disabled",
           "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    if COURSE:
        env.update(WORKBENCH_COURSE_SCALE="course", WORKBENCH_COURSE_MODEL="minilm-l6",
                   WORKBENCH_COURSE_CHAT_MODEL="smollm2-135m-instruct")
    else:
        env.update(WORKBENCH_COURSE_SCALE="smoke", WORKBENCH_COURSE_MODEL=str(tiny_model_dir))
        if name in CHAT_NOTEBOOKS:
            env["WORKBENCH_COURSE_CHAT_MODEL"] = str(request.getfixturevalue("tiny_chat_model_dir"))
    elsewhere = tmp_path / "elsewhere"  # nbval starts the kernel in the notebook's folder: not notebooks/ here
    elsewhere.mkdir()
    shutil.copy(NOTEBOOKS / name, elsewhere / name)
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", "--timeout", str(BUDGET_S),
           "-o", "addopts=", "--rootdir", str(elsewhere), str(elsewhere / name)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=BUDGET_S + 60)
    took = time.monotonic() - start
    assert proc.returncode == 0, f"{name} failed under nbval (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert took < BUDGET_S, f"{name} took {took:.0f} s, over the {BUDGET_S} s budget of a course notebook"


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A 2-layer Llama (hidden 32) with a ChatML template and a word-level tokenizer whose vocabulary is the
    ChatterBot corpus's words: the chat lab runs in seconds, on the real data, and its tokens read as words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from workbench.data import load_catalog_dataset

    pairs = load_catalog_dataset("chatterbot")
    words = {w for text in (*pairs["text"], *pairs["answer"]) for w in str(text).split()}
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + sorted(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    out = tmp_path_factory.mktemp("tiny-chat-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --- the dashboard page (notebooks/dashboard.ipynb), without a browser ------------------------------

@pytest.fixture
def dashboard_app(monkeypatch, tiny_model_dir, tiny_csv):
    monkeypatch.setenv("WORKBENCH_DEMO_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("WORKBENCH_DEMO_DATA", str(tiny_csv))
    monkeypatch.setenv("WORKBENCH_COURSE_SCALE", "smoke")
    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    for name in ("course", "dashboard_app"):
        sys.modules.pop(name, None)
    import dashboard_app

    yield dashboard_app
    for name in ("course", "dashboard_app"):
        sys.modules.pop(name, None)


def _close(dash) -> None:
    """Let the panels' worker threads (model inspection, file reading) finish before closing: a torch
    thread still running at interpreter exit aborts the process ("terminate called without an active exception")."""
    for panel in (dash.model, dash.data, dash.method):
        if panel is not None:  # a read-only dashboard builds no setup panels
            panel.wait(60)
    dash.close()


def _running_run(store, name="someone-else"):
    run_id = store.create_run({"name": name, "model": "x"}, name)
    store.mark_running(run_id, pid=os.getpid())  # alive: this very process
    return run_id


def test_dashboard_preselects_the_demo_config(dashboard_app, tiny_model_dir, tiny_csv, tmp_path):
    dash = dashboard_app.build(home=tmp_path, read_only=False)
    try:
        dash.data.wait()
        config = dash.config()
        assert (config.model, config.data.source, config.method.name) == (str(tiny_model_dir), str(tiny_csv), "lora")
        assert config.data.max_train_samples == 32 and config.train.max_length == 32
        assert dash.read_only is False and dash.train.status == "idle"
    finally:
        _close(dash)


def test_dashboard_demo_overrides_and_default(dashboard_app, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DEMO_OVERRIDES", "train.epochs=7 train.eval_every=5")
    config = dashboard_app.demo_config()
    assert (config.train.epochs, config.train.eval_every) == (7, 5)
    for name in ("WORKBENCH_DEMO_MODEL", "WORKBENCH_DEMO_DATA", "WORKBENCH_DEMO_OVERRIDES"):
        monkeypatch.delenv(name)
    default = dashboard_app.demo_config()
    assert (default.model, default.data.source, default.method.name) == ("minilm-l6", "bbc-news", "lora")


def test_dashboard_reattaches_to_the_running_run_and_refuses_a_second(dashboard_app, tmp_path):
    from workbench.store import RunStore

    run_id = _running_run(RunStore(tmp_path))
    dash = dashboard_app.build(home=tmp_path, read_only=False)
    try:
        assert dash.train.run_id == run_id, "a reload must follow the run in progress"
        assert dash.curve.run_ids == [run_id] and dash.confusion.run_id == run_id
        dash.train.start()
        assert "already going" in dash.train.error
    finally:
        _close(dash)


def test_dashboard_start_is_refused_while_another_visitor_trains(dashboard_app, tmp_path):
    from workbench.store import RunStore

    dash = dashboard_app.build(home=tmp_path, read_only=False)
    try:
        _running_run(RunStore(tmp_path), name="visitor-2")
        dash.train.start()
        assert "visitor-2 is training on this machine: one run at a time" in dash.train.error
        assert dash.train.status == "idle"
    finally:
        _close(dash)


def test_dashboard_two_clicks_at_once_start_one_run(dashboard_app, monkeypatch, tmp_path):
    """Two pages press Start together: both pass the first check, the start lock lets one run in."""
    from workbench.launch import attach
    from widgets.train_panel import TrainPanel

    def slow_launch(panel, config):
        time.sleep(0.5)  # preflight done, run not queued yet: where a second click used to get through
        return attach(panel.store.create_run(config.to_dict(), config.name), panel.store.home)

    monkeypatch.setattr(TrainPanel, "launch", slow_launch)
    pages = [dashboard_app.build(home=tmp_path, read_only=False) for _ in range(2)]
    try:
        for dash in pages:
            dash.data.wait()
        for dash in pages:
            dash.train.start()
        deadline = time.monotonic() + 60
        while any(d.train.status == "checking" for d in pages) and time.monotonic() < deadline:
            time.sleep(0.05)
        from workbench.store import RunStore

        assert len(RunStore(tmp_path).list()) == 1
        assert sorted(d.train.status for d in pages) == ["idle", "queued"]
        refused = next(d for d in pages if d.train.status == "idle")
        assert "is training on this machine: one run at a time" in refused.train.error
    finally:
        for dash in pages:
            dash.train._poller.stop()
            _close(dash)


def test_dashboard_read_only_from_the_environment(dashboard_app, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_READ_ONLY", "1")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    dash = dashboard_app.build()
    try:
        assert dash.read_only and dash.tabs.titles == ("Runs", "Watch", "Try")
        dash.train.start()
        assert "read-only" in dash.train.error
    finally:
        _close(dash)
