"""Calibration of classification runs: ECE, reliability bins, the fitted temperature, the abstaining predictor,
and a run that fits, stores and answers with its temperature (on the tiny model)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from workbench.calibration import (UNCERTAIN, CalibratedPredictor, calibrate, expected_calibration_error,
                                   fit_temperature, fitted_temperature, negative_log_likelihood, reliability_bins,
                                   scale)
from workbench.errors import WorkbenchError
from workbench.loop import train
from workbench.run_paths import RunPaths


def _calibrated_rows(n: int = 3000, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels drawn from them: calibrated by construction."""
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(0, 2, (n, classes)), axis=1)
    y = np.asarray([rng.choice(classes, p=p) for p in probs])
    return probs, y


# --- the figures -----------------------------------------------------------------------------------------

def test_ece_matches_a_hand_computed_example():
    probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]]
    y = [0, 1, 1, 0]
    # 10 bins: 0.9 right (bin 0.8-0.9], gap 0.1), 0.6 wrong and 0.55 right share (0.5, 0.6]: accuracy 0.5,
    # confidence 0.575, gap 0.075 x 2 rows; 0.7 right (bin (0.6, 0.7], gap 0.3)
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx((0.1 + 2 * 0.075 + 0.3) / 4)
    # 2 bins: everything in (0.5, 1]: accuracy 0.75, confidence 0.6875
    assert expected_calibration_error(probs, y, bins=2) == pytest.approx(0.0625)
    bins = reliability_bins(probs, y, bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 1, 0, 1, 0]
    assert bins[5] == {"lower": 0.5, "upper": 0.6, "count": 2, "confidence": pytest.approx(0.575), "accuracy": 0.5}
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None


def test_a_perfect_confident_model_has_zero_ece_and_bad_input_is_refused():
    assert expected_calibration_error([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0
    with pytest.raises(WorkbenchError, match="2 probability rows and 3 true labels"):
        expected_calibration_error([[0.5, 0.5], [0.5, 0.5]], [0, 1, 1])
    with pytest.raises(WorkbenchError, match="class indices 0..1"):
        expected_calibration_error([[0.5, 0.5]], [2])
    with pytest.raises(WorkbenchError, match="temperature must be above 0"):
        scale([[0.5, 0.5]], 0.0)


def test_the_temperature_of_overconfident_probabilities_lowers_ece_and_nll():
    probs, y = _calibrated_rows()
    overconfident = scale(probs, 0.4)  # the same argmax, logits 2.5 x too large
    record = calibrate(overconfident, y)
    assert record["temperature"] == pytest.approx(2.5, rel=0.1)
    assert record["ece_after"] < record["ece_before"] / 3
    assert record["nll_after"] < record["nll_before"]
    assert record["rows"] == len(y) and "same eval split" in record["note"]
    assert len(record["bins_before"]) == len(record["bins_after"]) == 10
    after = scale(overconfident, record["temperature"])
    assert (after.argmax(axis=1) == overconfident.argmax(axis=1)).all()  # accuracy never changes
    assert np.allclose(after.sum(axis=1), 1)


def test_calibrated_probabilities_keep_a_temperature_near_one_and_never_a_higher_ece():
    probs, y = _calibrated_rows(seed=1)
    assert fitted_temperature(probs, y) == pytest.approx(1.0, abs=0.1)
    record = calibrate(probs, y)
    assert record["ece_after"] <= record["ece_before"]
    assert np.allclose(scale(probs, 1.0), probs)


def test_a_temperature_that_would_raise_the_ece_is_not_kept():
    # NLL and ECE disagree: one confident mistake pulls the NLL-optimal temperature up, which spoils the
    # otherwise perfectly calibrated bins
    probs = np.asarray([[0.8, 0.2]] * 40 + [[0.999, 0.001]] * 4)
    y = np.asarray([0] * 32 + [1] * 8 + [1] * 4)
    assert fitted_temperature(probs, y) > 1.0
    assert expected_calibration_error(scale(probs, fitted_temperature(probs, y)), y) > \
        expected_calibration_error(probs, y)
    assert fit_temperature(probs, y) == 1.0
    record = calibrate(probs, y)
    assert record["temperature"] == 1.0 and record["ece_after"] == record["ece_before"]
    assert "left unscaled" in record["kept_identity"]
    assert negative_log_likelihood(probs, y) == record["nll_before"]


# --- the predictor ---------------------------------------------------------------------------------------

class _Inner:
    task, labels, tokenizer, max_length = "text-classification", ["neg", "pos"], "a tokenizer", 64

    def __init__(self) -> None:
        self.model = "model"

    def predict(self, texts, batch_size=32):
        confident = {"neg": 0.95, "pos": 0.05}
        unsure = {"neg": 0.4, "pos": 0.6}
        return [{"text": t, "label": "neg" if "bad" in t else "pos", "scores": confident if "bad" in t else unsure}
                for t in texts]


def test_the_calibrated_predictor_scales_abstains_and_delegates():
    inner = _Inner()
    wrapped = CalibratedPredictor(inner, 2.0, abstain_below=0.7)
    bad, meh = wrapped.predict(["bad film", "meh film"])
    expected = scale([[0.95, 0.05]], 2.0)[0]
    assert bad["label"] == "neg" and "abstained" not in bad
    assert bad["scores"]["neg"] == pytest.approx(expected[0]) and bad["scores"]["neg"] < 0.95
    assert meh == {"text": "meh film", "label": UNCERTAIN, "abstained": True, "top_label": "pos",
                   "scores": {"neg": pytest.approx(scale([[0.4, 0.6]], 2.0)[0][0]),
                              "pos": pytest.approx(scale([[0.4, 0.6]], 2.0)[0][1])}}
    assert wrapped.predict("bad")[0]["label"] == "neg"  # one text
    assert wrapped.probabilities(["bad", "meh"]).shape == (2, 2)
    assert (wrapped.labels, wrapped.tokenizer, wrapped.task, wrapped.max_length, wrapped.inner) == (
        inner.labels, inner.tokenizer, inner.task, inner.max_length, inner)
    wrapped.model = "merged"  # the server merges adapters through the wrapper: the inner model changes
    assert inner.model == "merged" and "model" not in vars(wrapped)
    again = wrapped.around(_Inner())
    assert (again.temperature, again.abstain_below) == (2.0, 0.7) and again.inner is not inner
    assert CalibratedPredictor(inner, 1.0).predict(["meh"])[0]["label"] == "pos"  # no threshold: answers
    with pytest.raises(WorkbenchError, match="abstain_below must be between 0 and 1"):
        CalibratedPredictor(inner, 1.0, abstain_below=70)


# --- runs ------------------------------------------------------------------------------------------------

def test_a_run_fits_stores_and_answers_with_its_temperature(tiny_config, store):
    from workbench.deploy.adapter import load_served_model
    from workbench.predict import load_predictor

    record = train(tiny_config(train={"baseline": False, "abstain_below": 0.9}), store=store)
    assert record["status"] == "completed", record["error"]
    cal = record["metrics"]["calibration"]
    assert cal["ece_after"] <= cal["ece_before"] and cal["of"] == "fine-tuned"
    stored = json.loads(RunPaths.of(record).calibration.read_text())
    assert stored["temperature"] == cal["temperature"] > 0
    rows = json.loads(RunPaths.of(record).eval_step(record["metrics"]["best_step"]).read_text())["rows"]
    texts = [r["text"] for r in rows]
    raw = load_predictor(record["id"], store.home, calibrated=False)
    calibrated = load_predictor(record["id"], store.home)
    assert isinstance(calibrated, CalibratedPredictor) and not isinstance(raw, CalibratedPredictor)
    assert calibrated.temperature == cal["temperature"] and calibrated.abstain_below == 0.9
    assert np.allclose(calibrated.probabilities(texts), scale(raw.probabilities(texts), cal["temperature"]))
    answers = calibrated.predict(texts)
    confidence = calibrated.probabilities(texts).max(axis=1)
    assert [a["label"] == UNCERTAIN for a in answers] == list(confidence < 0.9)
    assert all(a["top_label"] in raw.labels for a in answers if a.get("abstained"))
    served = load_served_model(record["id"], store.home)  # the server: adapters merged through the wrapper
    assert isinstance(served.predictor, CalibratedPredictor) and served.predictor.inner.model is served.predictor.model
    assert (served.labels, served.task) == (raw.labels, raw.task)
    assert served.tokenizer is served.predictor.inner.tokenizer is not None
    for got, want in zip(served.predict(texts[:8]), answers[:8]):
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5) and "text" not in got


def test_calibrate_off_writes_none_and_the_run_answers_unscaled(tiny_config, store):
    from workbench.predict import load_predictor

    record = train(tiny_config(train={"calibrate": False, "ensemble": "off"}), store=store)
    assert "calibration" not in record["metrics"] and not RunPaths.of(record).calibration.exists()
    assert not isinstance(load_predictor(record["id"], store.home), CalibratedPredictor)


def test_a_run_with_its_baseline_and_an_ensemble_of_runs_are_calibrated_on_what_they_answer_with(tiny_config,
                                                                                                 store):
    from workbench.ensembles import create_ensemble
    from workbench.predict import load_predictor
    from workbench.tasks.ensemble import EnsemblePredictor

    run = train(tiny_config(), store=store)
    cal = run["metrics"]["calibration"]
    assert cal["of"] == run["metrics"]["answers_with"]["by"] and cal["ece_after"] <= cal["ece_before"]
    ensemble = create_ensemble([run["id"]], store.home)  # the run's model and its baseline, averaged
    cal = ensemble["metrics"]["calibration"]
    assert cal["of"] == "ensemble" and cal["ece_after"] <= cal["ece_before"]
    assert json.loads(RunPaths.of(ensemble).calibration.read_text())["temperature"] == cal["temperature"]
    predictor = load_predictor(ensemble["id"], store.home)
    assert isinstance(predictor.inner, EnsemblePredictor) and predictor.temperature == cal["temperature"]


# --- the Train tab ---------------------------------------------------------------------------------------

def test_the_run_summary_and_the_reliability_figure_show_a_finished_runs_calibration(tmp_path):
    from workbench.config import Config
    from workbench.store import RunStore

    from widgets.reliability import calibration_text, reliability_figure
    from widgets.run_summary import RunSummary

    probs, y = _calibrated_rows(n=400, classes=2, seed=3)
    record = calibrate(scale(probs, 0.5), y)
    store = RunStore(tmp_path / "home")
    run_id = store.create_run(Config.from_dict({"train": {"abstain_below": 0.6}}).to_dict(), "run")
    store.mark_running(run_id)
    summary = RunSummary(store=store, background=False, run_id=run_id)
    assert summary.calibration is None and "ECE" not in summary._answer.value  # not while it trains
    store.finish(run_id, "completed", metrics={"accuracy": 0.7, "f1_macro": 0.7, "best_step": 1,
                                               "calibration": record})
    summary.refresh()
    expected = (f"ECE {record['ece_before']:.3f} -> {record['ece_after']:.3f} "
                f"(temperature {record['temperature']:.3g}), answers 'uncertain' below 0.6")
    assert calibration_text(summary.calibration, summary.abstain_below) == expected
    shown = html.unescape(summary._answer.value)
    assert expected in shown and "reliability per confidence bin (400 eval rows)" in shown
    fig = reliability_figure(record)
    before, after = fig.data[1], fig.data[2]
    assert list(fig.data[0].x) == [0, 1] == list(fig.data[0].y)  # the diagonal
    full = [b for b in record["bins_after"] if b["count"]]
    assert list(after.y) == [b["accuracy"] for b in full] and list(after.customdata) == [b["count"] for b in full]
    assert before.name.startswith("before (ECE") and f"{record['ece_after']:.3f}" in after.name
    summary.close()
