"""The served API's trust features: /v1/explain (word attributions of the served model), abstaining
("uncertain" under a threshold, the run's or the server's), and request logs that never carry personal data."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import numpy as np
import pytest

from workbench.calibration import CalibratedPredictor
from workbench.deploy.adapter import ServedModel
from workbench.deploy.app import ServeSettings, create_app
from workbench.deploy.server import ThreadedServer
from workbench.task_table import tasks_where

KEY = "wb-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLASSIFY = tasks_where(route="/v1/classify")[0]
CHAT = tasks_where(route="/v1/chat/completions")[0]


class Scores:
    """A classifier whose probability for "pos" is the share of the word "good" among a text's words."""

    task = CLASSIFY
    labels = ["neg", "pos"]

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        out = []
        for text in texts:
            words = text.split()
            pos = (words.count("good") + 0.5) / (len(words) + 1)
            out.append({"text": text, "label": "pos" if pos > 0.5 else "neg", "scores": {"neg": 1 - pos, "pos": pos}})
        return out

    def probabilities(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return np.asarray([[r["scores"]["neg"], r["scores"]["pos"]] for r in self.predict(texts)])


class Chat:
    task = CHAT

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int = 8, **sampling: Any) -> str:
        return "fine"


def _serve(predictor: Any, **settings: Any) -> ThreadedServer:
    app, _ = create_app(ServedModel(predictor, "run-x"), ServeSettings(**settings), KEY)
    return ThreadedServer(app)


@pytest.fixture(scope="module")
def tiny_classifier(tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workbench.tasks.classification import Predictor

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    return Predictor(model, AutoTokenizer.from_pretrained(str(tiny_model_dir)), ["neg", "pos"], 32, "run-x")


def test_explain_route_gives_one_attribution_per_word_of_each_text(tiny_classifier):
    with _serve(tiny_classifier) as url:
        r = httpx.post(url + "/v1/explain", json={"texts": ["a good film", "dull"], "steps": 8}, headers=AUTH,
                       timeout=120)
        schema = httpx.get(url + "/openapi.json").json()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "run-x" and len(body["results"]) == 2
    first = body["results"][0]
    assert [t["token"] for t in first["tokens"]] == ["a", "good", "film"]
    assert all("a good film"[t["start"]:t["end"]] == t["token"] for t in first["tokens"])
    assert first["method"] == "integrated-gradients" and first["label"] in ("neg", "pos")
    assert set(first["tokens"][0]["by_class"]) == {"neg", "pos"}
    assert "/v1/explain" in schema["paths"] and "ExplainRequest" in schema["components"]["schemas"]


def test_explain_refuses_what_it_cannot_explain(tiny_classifier):
    with _serve(tiny_classifier) as url:
        too_many = httpx.post(url + "/v1/explain", json={"texts": ["x"] * 9}, headers=AUTH)
        bad_steps = httpx.post(url + "/v1/explain", json={"texts": ["x"], "steps": 1}, headers=AUTH)
        no_key = httpx.post(url + "/v1/explain", json={"texts": ["x"]})
        unknown = httpx.post(url + "/v1/explain", json={"texts": ["a film"], "target": "maybe", "steps": 4},
                             headers=AUTH, timeout=60)
    assert too_many.status_code in (413, 422) and bad_steps.status_code == 422 and no_key.status_code == 401
    assert unknown.status_code == 422 and "maybe" in unknown.json()["error"]["message"]
    with _serve(Chat()) as url:
        r = httpx.post(url + "/v1/explain", json={"texts": ["hello"]}, headers=AUTH)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]


def test_abstaining_answers_uncertain_under_the_threshold_and_keeps_the_scores():
    calibrated = CalibratedPredictor(Scores(), 1.0, abstain_below=0.7)
    with _serve(calibrated) as url:
        r = httpx.post(url + "/v1/classify", json={"texts": ["good good good good", "good bad"]}, headers=AUTH)
    sure, unsure = r.json()["results"]
    assert sure["label"] == "pos" and "abstained" not in sure, "a confident answer has no abstain fields"
    assert unsure["label"] == "uncertain" and unsure["abstained"] is True and unsure["top_label"] in ("neg", "pos")
    assert sum(unsure["scores"].values()) == pytest.approx(1.0)


def test_the_servers_threshold_overrides_the_runs_and_wraps_an_uncalibrated_run():
    with _serve(Scores(), abstain_below=0.9) as url:
        r = httpx.post(url + "/v1/classify", json={"texts": ["good good good good", "good bad"]}, headers=AUTH)
    assert [a["label"] for a in r.json()["results"]] == ["pos", "uncertain"]
    with pytest.raises(ValueError, match="abstain_below"):
        ServeSettings(abstain_below=1.5)


def test_request_logs_with_text_mask_personal_data(caplog, tiny_classifier):
    texts = ["mail ann.lee@example.org or call +1 415 555 0100 about the good film"]
    with caplog.at_level(logging.INFO, logger="workbench.serve"):
        with _serve(Scores(), log_text=True) as url:
            r = httpx.post(url + "/v1/classify", json={"texts": texts}, headers=AUTH)
    assert r.status_code == 200
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "[EMAIL]" in logged and "[PHONE]" in logged, "the text is logged, masked"
    assert "ann.lee@example.org" not in logged and "555 0100" not in logged
