"""workbench serve: the real server on a free loopback port, called over HTTP.

Runs are trained here from tiny models built from a config (a 2-layer BERT classifier, a 2-layer Llama chat
model with a word-level tokenizer, a 2-layer T5): each trains in seconds. Most tests run uvicorn on a thread
of the test process; one starts `workbench serve` as its own process through the background API and stops it
with SIGTERM while a request is in flight."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import threading
import time

import httpx
import pytest
import torch

from workbench.config import Config
from workbench.deploy.adapter import ServedModel, drift_baseline, load_served_model
from workbench.deploy.app import ServeSettings, create_app
from workbench.deploy.batching import MicroBatcher
from workbench.deploy.keys import ensure_api_key, is_loopback, keys_match, read_key_file
from workbench.deploy.monitor import Baseline, parse_metrics, psi
from workbench.deploy.server import ThreadedServer, read_metrics, resolve_key, server_status, start_server, stop_server
from workbench.errors import WorkbenchError
from workbench.predict import load_predictor
from workbench.store import RunStore

KEY = "wb-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROTECTED = [("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/classify"),
             ("POST", "/v1/translate"), ("POST", "/v1/chat/completions"), ("GET", "/no-such-route")]
CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def _word_tokenizer(words: list[str], eos: str, chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token=eos)
    tok.chat_template = CHATML if chat else None
    return tok


def _train(raw: dict, home) -> str:
    import workbench

    raw = {**raw, "track": {"wandb": "disabled", "tensorboard": False}}
    record = workbench.train(Config.from_dict(raw), store=RunStore(home))
    assert record["status"] == "completed", record.get("error")
    return record["id"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def cls_run(home, tiny_model_dir, tiny_csv) -> str:
    return _train({"model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
                   "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                   "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32,
                             "warmup_ratio": 0.0, "early_stopping_patience": 0, "threads": 1}}, home)


@pytest.fixture(scope="module")
def chat_run(home, tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    things = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black"}
    words = (["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "what", "colour",
              "is", "the", "?"] + list(things) + sorted(set(things.values())) + [str(i) for i in range(60)])
    tok = _word_tokenizer(words, "<|im_end|>", chat=True)
    out = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 initializer_range=0.3, architectures=["LlamaForCausalLM"])).save_pretrained(out)
    tok.save_pretrained(out)
    rng = random.Random(0)
    rows = []
    for i in range(40):
        thing = rng.choice(sorted(things))
        rows.append({"prompt": f"what colour is the {thing} {i} ?", "completion": f"the {thing} is {things[thing]}"})
    data = out / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return _train({"task": "chat", "model": str(out), "data": {"source": str(data), "eval_fraction": 0.2},
                   "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                   "train": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-2, "max_length": 48,
                             "warmup_ratio": 0.0, "early_stopping_patience": 0, "threads": 1},
                   "chat": {"max_new_tokens": 6, "sample_prompts": 1}}, home)


@pytest.fixture(scope="module")
def s2s_run(home, tmp_path_factory) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    letters = list("abcdefgh")
    tok = _word_tokenizer(["<pad>", "</s>", "<unk>"] + letters, "</s>", chat=False)
    out = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                        decoder_start_token_id=tok.pad_token_id,
                                        architectures=["T5ForConditionalGeneration"])).save_pretrained(out)
    tok.save_pretrained(out)
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        words = [rng.choice(letters) for _ in range(rng.randint(2, 4))]
        rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    data = out / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return _train({"task": "seq2seq", "model": str(out), "data": {"source": str(data), "eval_fraction": 0.2},
                   "method": {"name": "full"},
                   "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "max_length": 16,
                             "warmup_ratio": 0.0, "early_stopping_patience": 0, "threads": 1},
                   "chat": {"max_new_tokens": 6, "sample_prompts": 1}}, home)


@pytest.fixture(scope="module")
def cls_model(cls_run, home) -> ServedModel:
    return load_served_model(cls_run, home)


def _serve(served: ServedModel, home=None, **settings):
    record = RunStore(home).get(served.run_id) if home else None
    app, state = create_app(served, ServeSettings(**settings), KEY,
                            baseline=(lambda s: drift_baseline(record)) if record else None)
    return ThreadedServer(app), state


# --- classification -----------------------------------------------------------------------------------------

def test_classify_answers_each_text_in_order_as_the_predictor_does(cls_model, cls_run, home):
    texts = ["great great wonderful film", "awful terrible plot", "the music was lovely lovely"]
    expected = load_predictor(cls_run, home).predict(texts)
    server, _ = _serve(cls_model)
    with server as url:
        r = httpx.post(url + "/v1/classify", json={"texts": texts}, headers=AUTH)
        health = httpx.get(url + "/healthz")  # no key needed
        ready = httpx.get(url + "/readyz", headers=AUTH)
        models = httpx.get(url + "/v1/models", headers=AUTH)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["label"] for x in results] == [e["label"] for e in expected]
    for got, want in zip(results, expected):
        assert set(got["scores"]) == set(cls_model.labels)
        for label in cls_model.labels:  # adapters merged for serving: same scores up to float rounding
            assert got["scores"][label] == pytest.approx(want["scores"][label], abs=1e-5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.json()["status"] == "ready" and ready.json()["task"] == "text-classification"
    assert models.json()["data"][0]["id"] == cls_run


def test_every_route_but_healthz_needs_the_key(cls_model):
    server, _ = _serve(cls_model)
    with server as url, httpx.Client(base_url=url) as client:
        assert client.get("/healthz").status_code == 200
        for method, path in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY},
                            {"Authorization": f"Basic {KEY}"}):
                r = client.request(method, path, headers=headers, json={"texts": ["x"]})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"


def test_oversize_and_malformed_input_get_json_errors_naming_the_limit(cls_model):
    server, _ = _serve(cls_model, max_body_bytes=4000, max_texts=4, max_chars=100)
    cases = [
        (b'{"texts": ["' + b"a " * 3000 + b'"]}', 413, "max_body_bytes"),
        (json.dumps({"texts": ["good film"] * 5}).encode(), 413, "max_texts"),
        (json.dumps({"texts": ["word " * 30]}).encode(), 413, "max_chars"),
        (b'{"texts": ["unclosed', 422, None),
        (b'["a list"]', 422, None),
        (json.dumps({"text": "singular"}).encode(), 422, None),
        (json.dumps({"texts": "not a list"}).encode(), 422, None),
        (json.dumps({"texts": [3]}).encode(), 422, None),
        (json.dumps({"texts": ["  "]}).encode(), 422, None),
        (b"\xff\xfe garbage", 422, None),
    ]
    with server as url:
        for body, status, limit in cases:
            r = httpx.post(url + "/v1/classify", content=body, headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code == status, (body[:40], r.text)
            error = r.json()["error"]
            assert error["message"] and "Traceback" not in r.text
            assert error.get("limit") == limit
            if limit:
                assert limit in error["message"]
        # a chunked body (no Content-Length) over the limit is cut off while it streams in
        def chunks():
            for _ in range(10):
                yield b"x" * 1000
        r = httpx.post(url + "/v1/classify", content=chunks(), headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["limit"] == "max_body_bytes"
        r = httpx.post(url + "/v1/translate", json={"texts": ["a"]}, headers=AUTH)
        assert r.status_code == 404 and "/v1/classify" in r.json()["error"]["message"]


def test_still_answers_after_200_bad_requests_and_metrics_count_exactly_what_was_sent(cls_model, cls_run, home):
    from prometheus_client.parser import text_string_to_metric_families

    server, _ = _serve(cls_model, home, max_texts=8)
    bad = [dict(headers={}, json={"texts": ["x"]}),  # 401
           dict(headers=AUTH, content=b"{nope"),  # 422
           dict(headers=AUTH, json={"texts": ["film"] * 9})]  # 413
    sent = {"401": 0, "422": 0, "413": 0}
    texts_sent, labels_seen = 0, {}
    with server as url, httpx.Client(base_url=url, timeout=30) as client:
        for i in range(200):
            kind = bad[i % 3]
            r = client.post("/v1/classify", **kind)
            sent[str(r.status_code)] += 1
        assert sent == {"401": 67, "422": 67, "413": 66}
        for texts in (["great film"], ["awful plot", "lovely music"], ["a", "b c", "terrible terrible"]):
            r = client.post("/v1/classify", json={"texts": texts}, headers=AUTH)
            assert r.status_code == 200
            texts_sent += len(texts)
            for x in r.json()["results"]:
                labels_seen[x["label"]] = labels_seen.get(x["label"], 0) + 1
        text = client.get("/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the official parser accepts it
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["workbench_requests"].samples
                if s.name == "workbench_requests_total"}
    assert requests[("classify", "401")] == 67
    assert requests[("classify", "422")] == 67
    assert requests[("classify", "413")] == 66
    assert requests[("classify", "200")] == 3
    m = parse_metrics(text)
    assert m["texts"] == texts_sent == 6
    assert m["labels"] == {label: labels_seen.get(label, 0) for label in cls_model.labels}
    assert m["batches"]["sum"] == 6  # every served text went through the model once
    assert m["latency"]["classify"]["count"] == 203
    assert m["in_flight"] == 1  # the /metrics request itself
    expected_tokens = sum(cls_model.count_tokens(["great film", "awful plot", "lovely music", "a", "b c",
                                                  "terrible terrible"]))
    assert m["tokens_in"] == expected_tokens
    assert set(m["drift"]) == {"predicted_label", "input_length"} and m["drift_samples"] == 6
    assert all(v >= 0 for v in m["drift"].values())


def test_concurrent_requests_are_grouped_into_micro_batches(cls_model):
    server, _ = _serve(cls_model, max_batch_size=16, max_wait_ms=300)
    with server as url:
        results = []

        def call(i: int) -> None:
            r = httpx.post(url + "/v1/classify", json={"texts": [f"great film {i}"]}, headers=AUTH, timeout=30)
            results.append(r.status_code)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = parse_metrics(httpx.get(url + "/metrics", headers=AUTH).text)
    assert results == [200] * 8
    assert m["batches"]["sum"] == 8
    assert m["batches"]["count"] < 8  # fewer model calls than requests: they were grouped


def test_no_traceback_or_text_reaches_a_client_or_the_log(cls_model, caplog):
    secret = "confidential words nobody may log"

    class Broken(ServedModel):
        def predict(self, texts):
            raise RuntimeError(f"boom with {texts[0]}")

    broken = Broken(cls_model.predictor, cls_model.run_id)
    server, _ = _serve(broken)
    with caplog.at_level(logging.INFO, logger="workbench.serve"), server as url:
        r = httpx.post(url + "/v1/classify", json={"texts": [secret]}, headers=AUTH)
        after = httpx.get(url + "/healthz")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error"
    assert secret not in r.text and "Traceback" not in r.text and "boom" not in r.text
    assert after.status_code == 200
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "classify" in logged and secret not in logged


async def _group_sizes(max_batch: int, max_wait_ms: float, sizes: list[int]) -> tuple[list[int], list[list]]:
    import asyncio

    calls: list[int] = []
    batcher = MicroBatcher(lambda items: [x * 10 for x in items], max_batch, max_wait_ms, calls.append)
    await batcher.start()
    try:
        jobs = [batcher.submit(list(range(n))) for n in sizes]
        results = await asyncio.gather(*jobs)
    finally:
        await batcher.stop()
    return calls, results


def test_micro_batcher_groups_up_to_the_limit_and_returns_each_request_its_own_results():
    import asyncio

    calls, results = asyncio.run(_group_sizes(8, 50, [3, 3, 3, 1, 5]))
    assert results == [[0, 10, 20]] * 3 + [[0]] + [[0, 10, 20, 30, 40]]
    assert sum(calls) == 15 and max(calls) <= 8 and len(calls) < 5
    calls, _ = asyncio.run(_group_sizes(1, 50, [1, 1, 1, 1]))
    assert calls == [1, 1, 1, 1]  # batch-1 serving: one request per model call


# --- chat and seq2seq ---------------------------------------------------------------------------------------

def test_chat_completions_work_with_the_openai_client_streamed_and_not(chat_run, home):
    from openai import OpenAI

    served = load_served_model(chat_run, home)
    expected = served.predictor.answer("what colour is the sky 3 ?", max_new_tokens=5)
    server, _ = _serve(served, max_tokens=32)
    with server as url:
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [chat_run]
        messages = [{"role": "user", "content": "what colour is the sky 3 ?"}]
        reply = client.chat.completions.create(model=chat_run, messages=messages, max_tokens=5, temperature=0)
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(model=chat_run, messages=messages, max_tokens=5, stream=True)]
        too_many = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                              json={"messages": messages, "max_tokens": 33})
        not_user = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                              json={"messages": [{"role": "assistant", "content": "hi"}]})
        unauthorized = OpenAI(base_url=url + "/v1", api_key="wrong-key-0123456789", max_retries=0)
        with pytest.raises(Exception) as caught:
            unauthorized.models.list()
        m = parse_metrics(httpx.get(url + "/metrics", headers=AUTH).text)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
    assert "".join(pieces) == expected
    assert too_many.status_code == 422 and too_many.json()["error"]["limit"] == "max_tokens"
    assert not_user.status_code == 422
    assert getattr(caught.value, "status_code", None) == 401
    assert m["requests"]["chat"]["200"] == 2 and m["tokens_out"] >= 2


def test_translate_answers_as_the_seq2seq_predictor_does(s2s_run, home):
    served = load_served_model(s2s_run, home)
    texts = ["a b c", "d e", "h g f e"]
    expected = [r["translation"] for r in served.predictor.predict(texts)]
    server, _ = _serve(served)
    with server as url:
        r = httpx.post(url + "/v1/translate", json={"texts": texts}, headers=AUTH)
        wrong = httpx.post(url + "/v1/classify", json={"texts": texts}, headers=AUTH)
    assert r.status_code == 200 and r.json()["translations"] == expected
    assert wrong.status_code == 404 and "/v1/translate" in wrong.json()["error"]["message"]


# --- keys, drift, the background server -------------------------------------------------------------------

def test_key_is_made_once_with_mode_0600_and_open_servers_stay_on_loopback(tmp_path):
    key, created = ensure_api_key(tmp_path)
    again, created_again = ensure_api_key(tmp_path)
    path = tmp_path / "serve" / "api_key"
    assert created and not created_again and key == again and len(key) > 30
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys_match(key, key) and not keys_match(key[:-1] + "x", key) and not keys_match(None, key)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    with pytest.raises(WorkbenchError, match="refusing to listen on 0.0.0.0 without an API key"):
        resolve_key(tmp_path, "0.0.0.0", None, no_api_key=True)
    assert resolve_key(tmp_path, "0.0.0.0", None, no_api_key=False)[0] == key  # beyond loopback: with the key
    loose = tmp_path / "loose"
    loose.write_text("x" * 40)
    os.chmod(loose, 0o644)
    with pytest.raises(WorkbenchError, match="chmod 600"):
        read_key_file(loose)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift():
    base = Baseline.from_eval(["a"] * 50 + ["b"] * 50, list(range(100)))
    assert psi([50, 50], [5, 5]) == pytest.approx(0.0)
    assert psi([50, 50], [9, 1]) > psi([50, 50], [6, 4]) > 0
    assert len(base.length_counts) == len(base.length_edges) + 1 and sum(base.length_counts) == 100


def test_background_server_survives_its_caller_drains_on_sigterm_and_cleans_up(cls_run, home):
    info = start_server(cls_run, home, max_wait_ms=3000, timeout=180)
    try:
        state_file = RunStore(home).run_dir(cls_run) / "deploy" / "server.json"
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        assert server_status(cls_run, home)["pid"] == info["pid"]
        assert os.getsid(info["pid"]) != os.getsid(0)  # its own session: closing ours does not end it
        headers = {"Authorization": f"Bearer {info['api_key']}"}
        slow: dict = {}

        def call() -> None:  # waits ~3 s in the batcher: in flight when SIGTERM arrives
            slow["r"] = httpx.post(info["url"] + "/v1/classify", json={"texts": ["great film"]}, headers=headers,
                                   timeout=60)

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 20
        while read_metrics(info)["in_flight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_metrics(info)["in_flight"] == 2  # the slow request and this /metrics request
        assert stop_server(cls_run, home)
        thread.join(timeout=60)
        assert slow["r"].status_code == 200 and slow["r"].json()["results"][0]["label"] in ("neg", "pos")
        assert server_status(cls_run, home) is None and not state_file.exists()
    finally:
        stop_server(cls_run, home)


def _accepted_nodelay(listener) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio on `listener` (as uvicorn does)."""
    import asyncio
    import socket

    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Proto(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Proto, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    return asyncio.run(main())


def test_served_connections_send_without_waiting_for_acks():
    """Pins a trap: asyncio sets TCP_NODELAY only where the socket's proto is IPPROTO_TCP, and accepted sockets
    copy the listener's. A listener made with proto 0 left Nagle on: each keep-alive response after the first
    waited ~40 ms for the client's delayed ACK."""
    import socket

    from workbench.deploy.server import _bind

    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the trap: proto 0
    plain.bind(("127.0.0.1", 0))
    assert _accepted_nodelay(plain) == 0
    listener = _bind("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP
    assert _accepted_nodelay(listener) != 0


def test_chat_samples_at_a_temperature_and_is_greedy_without_one(chat_run, home):
    served = load_served_model(chat_run, home)
    question = [{"role": "user", "content": "what colour is the sky 3 ?"}]
    greedy = served.predictor.answer(question, max_new_tokens=8)
    server, _ = _serve(served, max_tokens=32)
    with server as url:
        def ask(**sampling):
            r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60,
                           json={"messages": question, "max_tokens": 8, **sampling})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        plain = [ask() for _ in range(2)] + [ask(temperature=0)]
        torch.manual_seed(0)
        sampled = [ask(temperature=2.0) for _ in range(6)]
        nucleus = ask(temperature=2.0, top_p=1e-6)  # only the most likely token survives: greedy again
        bad = [httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"messages": question, **s})
               for s in ({"temperature": 2.5}, {"top_p": 0}, {"top_p": "high"})]
    assert plain == [greedy] * 3
    # at temperature 2 the tiny model (4 training steps) is far from sure of any token: six sampled answers of
    # 8 tokens are not all one answer (the seed above fixes the draws: the server runs in this process)
    assert len(set(sampled)) > 1
    assert nucleus == greedy
    assert [r.status_code for r in bad] == [422, 422, 422]
    assert "top_p" in bad[1].json()["error"]["message"]


def test_chat_and_translation_drift_on_input_lengths(chat_run, s2s_run, home):
    """No labels to compare: the lengths of served prompts against the evaluation prompts'."""
    for run, route, body in ((chat_run, "/v1/chat/completions",
                              lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 2}),
                             (s2s_run, "/v1/translate", lambda text: {"texts": [text]})):
        baseline = drift_baseline(RunStore(home).get(run))
        assert baseline is not None and not baseline.label_counts and sum(baseline.length_counts) >= 8
        server, _ = _serve(load_served_model(run, home), home=home)
        with server as url:
            for _ in range(12):  # far longer than any evaluation prompt
                r = httpx.post(url + route, headers=AUTH, json=body("a " * 200), timeout=60)
                assert r.status_code == 200, r.text
            drift = parse_metrics(httpx.get(url + "/metrics", headers=AUTH).text)["drift"]
        assert drift["input_length"] > 1.0, (run, drift)
        assert "predicted_label" not in drift
