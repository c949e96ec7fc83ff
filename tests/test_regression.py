"""Task text-regression: data, training through the one loop, figures, predict, export, errors."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from workbench.cli import main
from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.loop import train
from workbench.predict import load_predictor
from workbench.tasks.regression import load_regression_data, regression_result

GOOD = ["great", "wonderful", "superb"]
BAD = ["awful", "terrible", "dreadful"]
FILLER = ["the", "film", "was", "really", "quite", "a", "story", "with"]


def rating_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A rating 1..10 given away by how many good and bad words a text has: a tiny model can learn it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = rng.randint(0, 3)
        bad = 3 - good
        words = rng.sample(FILLER, 3) + [rng.choice(GOOD) for _ in range(good)] + [rng.choice(BAD) for _ in range(bad)]
        rng.shuffle(words)
        rows.append({"review": " ".join(words) + f" {i}", "stars": str(1 + 3 * good)})
    return rows


@pytest.fixture(scope="module")
def ratings_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("ratings") / "ratings.csv"
    rows = rating_rows(120) + [{"review": "no number here", "stars": "n/a"}, {"review": "", "stars": "5"}]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["review", "stars"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def regression_config(tiny_config, ratings_csv):
    def make(**sections):
        cfg = tiny_config(**sections).to_dict()
        cfg["task"] = "text-regression"
        cfg["data"]["source"] = str(ratings_csv)
        cfg["train"].update({"epochs": 4, "learning_rate": 1e-2})
        for section, values in sections.items():
            cfg[section].update(values)
        return Config.from_dict(cfg)

    return make


def test_data_finds_the_number_drops_what_is_not_one_and_standardises(regression_config):
    data = load_regression_data(regression_config().data, 42)
    assert (data.text_column, data.value_column) == ("review", "stars")
    assert len(data.train_texts) + len(data.eval_texts) == 120
    assert any("dropped 2 rows" in n for n in data.notes)
    assert data.mean == pytest.approx(np.mean(data.train_values)) and data.std > 0


def test_figures_match_a_direct_computation():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.5, 5.0])
    r = regression_result(3, 1.0, y, p, train_mean=2.0, texts=["a", "b", "c", "d"])
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((p - y) ** 2)))
    assert r["mae"] == pytest.approx(np.mean(np.abs(p - y)))
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r.payload["pearson"] < 1.0
    assert r.payload["baseline_rmse"] == pytest.approx(np.sqrt(np.mean((y - 2.0) ** 2)))
    assert r.mistakes[0]["index"] == 3 and r.mistakes[0]["error"] == pytest.approx(1.0)  # the worst error first


@pytest.mark.parametrize("method", ["lora", "full", "head-only"])
def test_training_beats_the_mean_and_predicts_in_the_data_units(regression_config, store, method):
    record = train(regression_config(method={"name": method}), store=store)
    assert record["status"] == "completed", record["error"]
    m = record["metrics"]
    assert set(m) >= {"rmse", "mae", "pearson", "spearman", "baseline_rmse", "best_step"}
    if method != "head-only":  # a frozen random tiny backbone cannot learn this; the adapters and full can
        assert m["rmse"] < 0.8 * m["baseline_rmse"], m
        assert m["spearman"] > 0.5, m
    rows = json.loads(open(m["predictions_file"]).read())["rows"]
    assert len(rows) == record["info"]["eval_rows"] and {"true", "predicted", "text"} <= set(rows[0])
    predictor = load_predictor(record["id"], store.home)
    values = [r["value"] for r in predictor.predict(["great superb wonderful film", "awful terrible dreadful film"])]
    assert all(0.0 < v < 12.0 for v in values)  # stars, not standardised units
    saved = [r["predicted"] for r in rows[:4]]
    again = [r["value"] for r in predictor.predict([r["text"] for r in rows[:4]])]
    assert again == pytest.approx(saved, abs=1e-4)


def test_best_checkpoint_is_the_lowest_rmse(regression_config, store):
    record = train(regression_config(train={"eval_every": 3}), store=store)
    evals = [p for p in store.points(record["id"], kind="eval")]
    best = min(evals, key=lambda p: p["rmse"])
    assert record["metrics"]["best_step"] == best["step"]


@pytest.mark.parametrize("raw, match", [
    ({"method": {"name": "zero-shot-embedding"}}, r"method.name = 'zero-shot-embedding' is not allowed: one of full"),
    ({"train": {"class_weights": "balanced"}}, r"train.class_weights = 'balanced' is not allowed: auto \(the default\) for task: "
                                               r"text-regression"),
])
def test_settings_that_do_not_apply_are_refused(raw, match):
    with pytest.raises(WorkbenchError, match=match):
        Config.from_dict({"task": "text-regression", **raw})


def test_a_text_column_is_not_a_number(regression_config, store, tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("review,stars\n" + "".join(f"text {i},many\n" for i in range(20)))
    cfg = regression_config(data={"source": str(path), "label_column": "stars"})
    with pytest.raises(WorkbenchError, match=r"0 rows with a text and a numeric 'stars'"):
        load_regression_data(cfg.data, 42)


def test_cli_trains_predicts_and_exports(regression_config, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    cfg_path = tmp_path / "reg.yaml"
    regression_config(train={"epochs": 1}).save(cfg_path)
    assert main(["train", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "rmse" in out
    assert main(["predict", "latest", "--text", "great superb film"]) == 0
    assert "value" in capsys.readouterr().out
    assert main(["export", "latest", "--merge", "--out", str(tmp_path / "exported")]) == 0
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported["problem_type"] == "regression" and len(exported["id2label"]) == 1


def test_the_dashboard_sets_up_trains_and_shows_a_regression_run(tiny_model_dir, ratings_csv, tmp_path):
    """Task text-regression chosen in the page: the data panel reads the numbers, Start launches the run, and
    the diagnostics slot shows predicted against true values instead of a confusion matrix."""
    from widgets import Dashboard

    dash = Dashboard(home=tmp_path / "home", background=False, models=None)
    dash.model.value = str(tiny_model_dir)
    dash.task.value = "text-regression"
    dash.data.source = str(ratings_csv)
    dash.data.wait(60)
    assert dash.data.label_column == "stars" and dash.data.value_range is not None
    assert not dash.data.errors, dash.data.errors
    dash.method.from_config(Config.from_dict({"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}}).method)
    dash.train.from_config(Config.from_dict({"train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2,
                                                       "max_length": 32, "threads": 1}}).train)
    config = dash.config()
    assert config.task == "text-regression" and config.data.label_column == "stars"
    dash.train.start()
    assert dash.train.error == "", dash.train.error
    record = dash.train.handle.wait(timeout=600)
    assert record["status"] == "completed", record["error"]
    assert dash.confusion.run_id == record["id"]  # the page follows the run it started
    dash.confusion.refresh()
    view = dash.confusion.regression
    assert view is not None and dash.confusion.children == (view,)
    assert view.points == record["info"]["eval_rows"] and view.figures["rmse"] == pytest.approx(record["metrics"]["rmse"])
    assert view.worst and abs(view.worst[0]["predicted"] - view.worst[0]["true"]) >= abs(
        view.worst[-1]["predicted"] - view.worst[-1]["true"])
    saved = dash.config().to_dict()
    dash.from_config(Config.from_dict(saved))
    assert dash.task.value == "text-regression"
    with pytest.raises(WorkbenchError, match="this page sets up text-classification, text-regression and token-classification runs"):
        dash.from_config(Config.from_dict({"task": "chat", "data": {"source": "chatterbot"}}))


def test_served_values_and_their_drift_against_the_evaluation_split(regression_config, store):
    """/v1/classify answers a value per text; drift compares predicted values over the evaluation deciles
    (not each float as a label of its own)."""
    import httpx

    from workbench.deploy.adapter import drift_baseline, load_served_model
    from workbench.deploy.app import ServeSettings, create_app
    from workbench.deploy.monitor import parse_metrics
    from workbench.deploy.server import ThreadedServer

    record = train(regression_config(method={"name": "lora"}), store=store)
    assert record["status"] == "completed", record["error"]
    rows = json.loads(open(record["metrics"]["predictions_file"]).read())["rows"]
    baseline = drift_baseline(store.get(record["id"]))
    assert not baseline.label_counts and sum(baseline.value_counts) == len(rows) > 0
    assert len(baseline.value_counts) == len(baseline.value_edges) + 1 > 2
    key = "wb-test-key-0123456789abcdef"
    app, _ = create_app(load_served_model(record["id"], store.home), ServeSettings(), key,
                        baseline=lambda served: baseline)
    auth = {"Authorization": f"Bearer {key}"}
    with ThreadedServer(app) as url:
        same = httpx.post(url + "/v1/classify", headers=auth, json={"texts": [r["text"] for r in rows]}).json()
        after_same = parse_metrics(httpx.get(url + "/metrics", headers=auth).text)["drift"]
        for _ in range(3):  # then only the happiest reviews: every value at the top of the scale
            httpx.post(url + "/v1/classify", headers=auth, json={"texts": ["great superb wonderful film"] * 20})
        after_shift = parse_metrics(httpx.get(url + "/metrics", headers=auth).text)["drift"]
    assert [r["value"] for r in same["results"]] == pytest.approx([r["predicted"] for r in rows], abs=1e-4)
    # the same texts again: PSI under 0.1, the usual "no shift" line (not 0: a value on a decile edge can land on
    # either side when the batch differs, as on AVX-512 CPUs whose kernels depend on the batch shape)
    assert after_same["predicted_value"] < 0.1
    assert after_shift["predicted_value"] > 0.5 > after_same["predicted_value"]
    assert "predicted_label" not in after_shift
