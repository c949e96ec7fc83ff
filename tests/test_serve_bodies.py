"""The serving API's bodies (issue 20): Pydantic models that FastAPI validates and /openapi.json shows, the
one-line refusals they turn into, one handler shape for the text routes, /v1/ner, and the route of each run
read from its task's row.

Stand-in predictors answer (no training): each names its task as the real ones do (`.task`), so the server
finds its route in the task table. One test serves a real `EntityPredictor` over an untrained tiny BERT.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from workbench.deploy.adapter import ServedModel, drift_baseline
from workbench.deploy.app import ServeSettings, create_app
from workbench.deploy.monitor import Baseline, parse_metrics
from workbench.deploy.server import ThreadedServer
from workbench.errors import WorkbenchError
from workbench.task_table import TASKS, task_spec, tasks_where

KEY = "wb-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLASSIFY, REGRESS, NER, CHAT, S2S = (tasks_where(route="/v1/classify")[0], tasks_where(route="/v1/classify")[1],
                                     tasks_where(kind="tokens")[0], tasks_where(route="/v1/chat/completions")[0],
                                     tasks_where(route="/v1/translate")[0])


class Fake:
    """A predictor of any task: a label, a value, entities (each capitalised word a PER), a translation or an
    answer, as the task's real predictor gives them."""

    labels = ["neg", "pos"]
    types = ["LOC", "PER"]

    def __init__(self, task: str) -> None:
        self.task = task
        if task_spec(task).kind == "tokens":
            self.labels = None  # a tagger has entity types, not labels

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        spec = task_spec(self.task)
        if spec.generates:
            return [{"text": t, "translation": t[::-1]} for t in texts]
        if spec.kind == "tokens":
            return [{"text": t, "entities": _capitalised(t), "tokens": t.split(), "tags": []} for t in texts]
        if spec.classes:
            return [{"text": t, "label": "pos" if "good" in t else "neg", "scores": {"neg": 0.25, "pos": 0.75}}
                    for t in texts]
        return [{"text": t, "value": float(len(t))} for t in texts]

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int = 8, **sampling: Any) -> str:
        return "fine"


def _capitalised(text: str) -> list[dict[str, Any]]:
    out, start = [], 0
    for word in text.split(" "):
        if word[:1].isupper():
            out.append({"type": "PER", "start": start, "end": start + len(word), "text": word, "score": 0.9})
        start += len(word) + 1
    return out


def _serve(task: str, baseline: Baseline | None = None, predictor: Any = None, **settings: Any) -> ThreadedServer:
    served = ServedModel(predictor or Fake(task), "run-x")
    app, _ = create_app(served, ServeSettings(**settings), KEY, baseline=lambda s: baseline)
    return ThreadedServer(app)


# --- the schema -------------------------------------------------------------------------------------------------

def test_openapi_lists_every_routes_request_and_response_models_and_the_limits():
    with _serve(CLASSIFY, max_texts=7, max_chars=300, max_messages=5, max_tokens=99) as url:
        spec = httpx.get(url + "/openapi.json").json()  # no key: the schema holds nothing private
        docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths, schemas = spec["paths"], spec["components"]["schemas"]

    def ref(op: dict[str, Any], status: str) -> str:
        return op["responses"][status]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]

    def request(op: dict[str, Any]) -> str:
        return op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]

    answers = {"/v1/classify": "ClassifyResponse", "/v1/translate": "TranslateResponse", "/v1/ner": "NerResponse"}
    assert {t.route for t in TASKS.values() if t.route} <= set(paths)  # every task's route is served
    for path, response in answers.items():
        op = paths[path]["post"]
        assert request(op) == "TextsRequest" and ref(op, "200") == response
        assert ref(op, "422") == ref(op, "413") == "ErrorBody"
        assert op["security"] == [{"HTTPBearer": []}]
    chat = paths["/v1/chat/completions"]["post"]
    assert request(chat) == "ChatRequest" and ref(chat, "200") == "ChatCompletion"
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    for path, response in (("/v1/models", "ModelList"), ("/readyz", "Ready"), ("/healthz", "Health")):
        assert ref(paths[path]["get"], "200") == response
    assert "security" not in paths["/healthz"]["get"]
    texts = schemas["TextsRequest"]["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"], texts["items"]["maxLength"]) == (1, 7, 300)
    chat_body = schemas["ChatRequest"]["properties"]
    assert chat_body["messages"]["maxItems"] == 5
    assert chat_body["max_tokens"]["anyOf"][0]["maximum"] == 99
    assert set(schemas["Entity"]["properties"]) == {"type", "start", "end", "text", "score"}
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "limit"}
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_every_route_of_the_schema_but_health_and_the_docs_needs_the_key():
    with _serve(NER) as url, httpx.Client(base_url=url) as client:
        paths = client.get("/openapi.json").json()["paths"]
        answers = {(method.upper(), path): client.request(method, path, json={"texts": ["x"]}).status_code
                   for path, ops in paths.items() for method in ops}
        keyed = client.post("/v1/ner", json={"texts": ["Ada"]}, headers=AUTH).status_code
    assert answers.pop(("GET", "/healthz")) == 200
    assert ("POST", "/v1/ner") in answers and set(answers.values()) == {401}
    assert keyed == 200


# --- refusals: one line, naming the field and the fix --------------------------------------------------------------

@pytest.mark.parametrize("body, status, message, limit", [
    ({}, 422, 'field "texts" is missing: send {"texts": ["a text", ...]}', None),
    ({"texts": "one"}, 422, 'field "texts" must be a non-empty list of strings', None),
    ({"texts": []}, 422, 'field "texts" must be a non-empty list of strings', None),
    ({"texts": ["a"] * 5}, 413, "5 texts is more than max_texts=4: send at most 4 per request", "max_texts"),
    ({"texts": ["good", 3]}, 422, "texts[1] is a int: every text must be a string", None),
    ({"texts": ["good", " \n"]}, 422, "texts[1] is empty: send text to process", None),
    ({"texts": ["x" * 21]}, 413, "texts[0] has 21 characters, more than max_chars=20", "max_chars"),
    ({"texts": ["x\ud800"]}, 422, "texts[0] holds an unpaired UTF-16 surrogate (U+D800) at character 1", None),
    ({"texts": ["a\x00b"]}, 422, "texts[0] holds a NUL character at character 1", None),
    (["a list"], 422, "the body is a JSON list: send a JSON object", None),
    (b'{"texts": ["unclosed', 422, "the body is not valid JSON", None),
    (b"", 422, "the body is not valid JSON", None),
])
def test_bad_text_bodies_are_refused_in_one_line_naming_the_field(body, status, message, limit):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with _serve(CLASSIFY, max_texts=4, max_chars=20) as url:
        r = httpx.post(url + "/v1/classify", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"] and len(r.text.splitlines()) == 1
    assert r.json()["error"].get("limit") == limit
    assert r.json()["error"]["type"] == ("limit_exceeded" if limit else "invalid_request_error")


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type_says(content_type):
    """`curl -d '{"texts": [...]}' URL` (the README's example) sends form-urlencoded: read as JSON, as always."""
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    with _serve(CLASSIFY) as url:
        good = httpx.post(url + "/v1/classify", content=b'{"texts": ["good"]}', headers=headers)
        bad = httpx.post(url + "/v1/classify", content=b"texts=good", headers=headers)
    assert good.status_code == 200 and good.json()["results"][0]["label"] == "pos"
    assert bad.status_code == 422 and "the body is not valid JSON" in bad.json()["error"]["message"]


def _message(content: Any, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": content}


@pytest.mark.parametrize("extra, status, message, limit", [
    ({"messages": []}, 422, 'field "messages" must be a non-empty list', None),
    ({"messages": [_message("hi")] * 4}, 413, "4 messages is more than max_messages=3", "max_messages"),
    ({"messages": [_message("hi", "robot")]}, 422, "messages[0] needs a role of system, user or assistant", None),
    ({"messages": ["hi"]}, 422, "messages[0] needs a role of system, user or assistant", None),
    ({"messages": [_message("hi", "assistant")]}, 422, "the last message must come from the user", None),
    ({"messages": [_message("  ")]}, 422, "the last user message is empty", None),
    ({"messages": [_message([{"type": "image_url", "image_url": "x"}])]}, 422,
     "messages[0].content holds a part that is not text", None),
    ({"messages": [_message(5)]}, 422, "messages[0].content is a int: it must be a string", None),
    ({"messages": [_message("x" * 21)]}, 413, "messages[0].content has 21 characters, more than max_chars=20",
     "max_chars"),
    ({"max_tokens": 17}, 422, "max_tokens=17 is more than the server's limit max_tokens=16", "max_tokens"),
    ({"max_completion_tokens": 0}, 422, "max_completion_tokens must be a whole number >= 1, got 0", None),
    ({"max_tokens": True}, 422, "max_tokens must be a whole number >= 1, got True", None),
    ({"temperature": "hot"}, 422, "temperature must be a number from 0 to 2, got 'hot'", None),
    ({"top_p": 0}, 422, "top_p must be a number above 0 and at most 1, got 0", None),
    ({"n": 2}, 422, "n=2: this server returns one choice per request; send n=1", None),
])
def test_bad_chat_bodies_are_refused_in_one_line_naming_the_field(extra, status, message, limit):
    body = {"messages": [_message("hi")], **extra}
    with _serve(CHAT, max_chars=20, max_messages=3, max_tokens=16) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert r.json()["error"].get("limit") == limit


def test_chat_takes_text_parts_and_the_newer_max_completion_tokens():
    with _serve(CHAT) as url:
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={
            "model": "anything", "messages": [_message([{"type": "text", "text": "hello "}, {"type": "text",
                                                                                        "text": "there"}])],
            "max_completion_tokens": 4, "temperature": 1, "user": "an OpenAI field this server ignores"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"] == _message("fine", "assistant")
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


# --- the route of a run is its task's ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", [CLASSIFY, REGRESS, NER, S2S, CHAT])
def test_each_run_answers_on_its_tasks_route_and_names_it_on_the_others(task):
    route = task_spec(task).route
    others = sorted({t.route for t in TASKS.values() if t.route} - {route})
    with _serve(task) as url:
        ready = httpx.get(url + "/readyz", headers=AUTH).json()
        wrong = {path: httpx.post(url + path, headers=AUTH, json={"texts": 3, "messages": 3}) for path in others}
    assert (ready["task"], ready["route"]) == (task, route)
    for path, r in wrong.items():  # before the body is read: a bad body on the wrong route is still a 404
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["message"] == f"run run-x is a {task} run: it answers on {route}, not {path}"


def test_a_predictor_naming_no_known_task_is_refused_with_the_choices():
    with pytest.raises(WorkbenchError, match=f"task 'classification' is unknown: choose from {CLASSIFY}"):
        ServedModel(Fake("classification"), "run-x")


def test_classify_answers_labels_and_regression_values_in_their_own_shapes():
    with _serve(CLASSIFY) as url:
        labels = httpx.post(url + "/v1/classify", headers=AUTH, json={"texts": ["good film", "bad"]}).json()
    with _serve(REGRESS) as url:
        values = httpx.post(url + "/v1/classify", headers=AUTH, json={"texts": ["good film", "bad"]}).json()
    assert labels == {"model": "run-x", "artifact": "fp32", "results": [
        {"label": "pos", "scores": {"neg": 0.25, "pos": 0.75}}, {"label": "neg", "scores": {"neg": 0.25, "pos": 0.75}}]}
    assert values["results"] == [{"value": 9.0}, {"value": 3.0}]


# --- /v1/ner --------------------------------------------------------------------------------------------------

def test_ner_answers_entities_with_offsets_and_counts_their_types_for_drift():
    baseline = Baseline.from_eval(["PER"] * 5 + ["LOC"] * 5, [20] * 10)
    texts = ["Ada met Alan in town", "nobody here", "then Grace left"]
    with _serve(NER, baseline) as url:
        r = httpx.post(url + "/v1/ner", headers=AUTH, json={"texts": texts})
        m = parse_metrics(httpx.get(url + "/metrics", headers=AUTH).text)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "run-x" and [x["text"] for x in body["results"]] == texts
    assert body["results"][0]["entities"] == [
        {"type": "PER", "start": 0, "end": 3, "text": "Ada", "score": 0.9},
        {"type": "PER", "start": 8, "end": 12, "text": "Alan", "score": 0.9}]
    assert body["results"][1]["entities"] == []
    for text, result in zip(texts, body["results"]):
        assert set(result) == {"text", "entities"}  # tokens and tags stay in the predictor's answer
        assert all(text[e["start"]: e["end"]] == e["text"] for e in result["entities"])
    assert m["labels"] == {"LOC": 0, "PER": 3} and m["texts"] == 3
    assert m["requests"]["ner"]["200"] == 1
    assert set(m["drift"]) == {"predicted_label", "input_length"} and m["drift"]["predicted_label"] > 0


def test_ner_serves_a_real_entity_predictor_as_it_predicts(tiny_model_dir):
    from transformers import AutoTokenizer, BertForTokenClassification

    from workbench.tasks.token_classification import EntityPredictor

    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    model = BertForTokenClassification.from_pretrained(tiny_model_dir, num_labels=len(tags))
    predictor = EntityPredictor(model, AutoTokenizer.from_pretrained(tiny_model_dir), tags, 32, "run-x", NER)
    texts = ["Ada Lovelace visited London in June", "a sentence, with punctuation!"]
    expected = [{"text": p["text"], "entities": p["entities"]} for p in predictor.predict(texts)]
    with _serve(NER, predictor=predictor) as url:
        r = httpx.post(url + "/v1/ner", headers=AUTH, json={"texts": texts})
        m = parse_metrics(httpx.get(url + "/metrics", headers=AUTH).text)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == expected
    assert set(m["labels"]) == {"LOC", "PER"}  # the tagger's entity types, each shown from the start


def test_ner_drift_baseline_is_the_entity_types_of_the_best_evaluation(tmp_path):
    rows = [{"text": "Ada met Alan", "predicted_spans": [{"type": "PER"}, {"type": "PER"}]},
            {"text": "in Paris", "predicted_spans": [{"type": "LOC"}]}, {"text": "nothing", "predicted_spans": []}]
    preds = tmp_path / "step-4.json"
    preds.write_text(json.dumps({"rows": rows}))
    record = {"id": "run-x", "dir": str(tmp_path), "config": {"task": NER},
              "metrics": {"predictions_file": str(preds), "best_step": 4}}
    baseline = drift_baseline(record)
    assert baseline.label_counts == {"PER": 2, "LOC": 1}
    assert sum(baseline.length_counts) == 3
