"""Batching while generating (issue 23): chat answers of concurrent requests share decode steps
(deploy/generation.py), translations of concurrent requests share one encoder-decoder `generate`.

The chat model is a tiny Llama built from a config (test_chat's word tokenizer, wide initial weights so
that greedy answers vary from prompt to prompt), wrapped in LoRA as a served chat run is; greedy answers
through the batch must equal `ChatPredictor.answer`'s one-at-a-time `model.generate`. One integration test
does the same on the packaged SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
import torch

from test_chat import word_tokenizer
from workbench.deploy.adapter import ServedModel
from workbench.deploy.app import ServeSettings, create_app
from workbench.deploy.batching import QueueFull
from workbench.deploy.monitor import parse_metrics
from workbench.deploy.server import ThreadedServer
from workbench.tasks.chat import ChatPredictor

KEY = "wb-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
THINGS = ["sky", "grass", "sun", "sea", "snow", "coal", "rose", "lemon", "leaf", "cloud"]


def questions(n: int) -> list[list[dict[str, str]]]:
    """n conversations of different lengths (so the batch's rows are left-padded differently)."""
    return [[{"role": "user", "content": "what colour is the " + " ".join(THINGS[: 1 + i % 7]) + f" {i} ?"}]
            for i in range(n)]


@pytest.fixture(scope="module")
def chat_predictor() -> ChatPredictor:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, initializer_range=0.3))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"],
                                             init_lora_weights=False))  # a served run's adapters, unmerged
    return ChatPredictor(model, tok, max_length=128, max_new_tokens=8, run_id="tiny-chat")


def _scheduler(served: ServedModel, **kwargs: Any):
    steps: list[int] = []
    return served.scheduler(on_step=steps.append, **{"max_batch": 8, "max_queue": 64, **kwargs}), steps


async def _answer(scheduler, served: ServedModel, messages, max_tokens: int, delay: float = 0.0, **sampling):
    await asyncio.sleep(delay)
    ticket = scheduler.submit(served.prompt_ids(messages), max_tokens, **sampling)
    pieces = []
    while (piece := await ticket.next()) is not None:
        pieces.append(piece)
    return "".join(pieces), ticket.result


# --- the scheduler ------------------------------------------------------------------------------------------

def test_batched_greedy_answers_equal_one_at_a_time_answers(chat_predictor):
    served = ServedModel(chat_predictor, "tiny-chat")
    asked = questions(10)
    lengths = [3 + 2 * i for i in range(10)]  # rows leave the batch at different steps
    expected = [chat_predictor.answer(q, max_new_tokens=n) for q, n in zip(asked, lengths)]
    assert len(set(expected)) > 5, "the tiny model must answer differently to different prompts"
    scheduler, steps = _scheduler(served, max_batch=4)

    async def run():
        scheduler.start()
        try:  # staggered arrivals: new rows join a batch that is already decoding
            return await asyncio.gather(*[_answer(scheduler, served, q, n, delay=0.002 * i)
                                          for i, (q, n) in enumerate(zip(asked, lengths))])
        finally:
            scheduler.stop()

    results = asyncio.run(run())
    assert [r.text for _, r in results] == expected
    assert [streamed for streamed, _ in results] == expected  # the streamed pieces make the same answer
    assert max(steps) == 4 and len(steps) < sum(lengths) / 2  # rows shared forward passes, at most max_batch
    assert all(r.finish_reason in ("stop", "length") and r.completion_tokens <= n
               for (_, r), n in zip(results, lengths))
    assert scheduler.waiting == 0


def test_sampled_rows_beside_greedy_rows(chat_predictor):
    served = ServedModel(chat_predictor, "tiny-chat")
    asked = questions(6)
    greedy = [chat_predictor.answer(q, max_new_tokens=10) for q in asked]
    scheduler, _ = _scheduler(served)

    async def run():
        scheduler.start()
        try:
            torch.manual_seed(0)
            return await asyncio.gather(
                *[_answer(scheduler, served, q, 10) for q in asked[:3]],
                *[_answer(scheduler, served, q, 10, temperature=1.5) for q in asked[3:]],
                *[_answer(scheduler, served, asked[0], 10, temperature=1.5) for _ in range(4)],
                _answer(scheduler, served, asked[1], 10, temperature=1.5, top_p=1e-6))
        finally:
            scheduler.stop()

    results = [r.text for _, r in asyncio.run(run())]
    assert results[:3] == greedy[:3]  # greedy rows are unchanged by sampled rows beside them
    assert len(set(results[6:10])) > 1  # four draws at temperature 1.5 for one prompt are not all alike
    assert results[10] == greedy[1]  # top_p this small keeps only the most likely token: greedy again


def test_a_cancelled_row_frees_its_slot_and_the_queue_is_bounded(chat_predictor):
    served = ServedModel(chat_predictor, "tiny-chat")
    scheduler, _ = _scheduler(served, max_batch=1, max_queue=2)
    prompt = served.prompt_ids(questions(1)[0])
    handle = chat_predictor.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))  # slower steps

    async def run():
        scheduler.start()
        try:
            first = scheduler.submit(prompt, 200)
            second = scheduler.submit(prompt, 3)
            with pytest.raises(QueueFull) as full:
                scheduler.submit(prompt, 3)
            assert full.value.limit == 2 and full.value.retry_after >= 1
            await first.next()  # generating: the second waits for the one slot
            first.cancel()
            answer = await asyncio.wait_for(second.text(), 30)
            while await first.next() is not None:
                pass
            return first.result, answer
        finally:
            scheduler.stop()

    try:
        cancelled, answer = asyncio.run(run())
    finally:
        handle.remove()
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 200
    assert answer == chat_predictor.answer(questions(1)[0], max_new_tokens=3)
    assert scheduler.waiting == 0


# --- through the server -------------------------------------------------------------------------------------

def _serve(served: ServedModel, **settings: Any):
    app, state = create_app(served, ServeSettings(**{"max_tokens": 64, **settings}), KEY)
    return ThreadedServer(app), state


def _chat(url: str, messages, max_tokens: int, stream: bool = False) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": messages, "max_tokens": max_tokens, "stream": stream})


def _streamed(response: httpx.Response) -> str:
    import json

    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])


def test_concurrent_chat_requests_are_answered_together_as_one_at_a_time(chat_predictor):
    asked = questions(8)
    expected = [chat_predictor.answer(q, max_new_tokens=12) for q in asked]
    server, state = _serve(ServedModel(chat_predictor, "tiny-chat"), max_generation_batch=8)
    answers: list[Any] = [None] * 8
    with server as url:
        def ask(i: int) -> None:
            r = _chat(url, asked[i], 12, stream=i % 2 == 1)
            assert r.status_code == 200, r.text
            answers[i] = _streamed(r) if i % 2 else r.json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = parse_metrics(httpx.get(url + "/metrics", headers=AUTH).text)
    assert answers == expected
    assert m["requests"]["chat"]["200"] == 8


def test_a_closed_stream_frees_its_row_and_limits_still_answer(chat_predictor):
    served = ServedModel(chat_predictor, "tiny-chat")
    slow = chat_predictor.model.register_forward_pre_hook(lambda *a: time.sleep(0.05))  # a step >= 50 ms
    try:
        server, state = _serve(served, max_generation_batch=1, max_queue=2, request_timeout_s=1.0)
        with server as url:
            with httpx.Client(timeout=30) as client:
                with client.stream("POST", url + "/v1/chat/completions", headers=AUTH,
                                   json={"messages": questions(1)[0], "max_tokens": 64, "stream": True}) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first event; then the client goes away
            deadline = time.monotonic() + 10
            while state.generator.waiting and time.monotonic() < deadline:
                time.sleep(0.02)
            freed = state.generator.waiting
            results: dict[str, httpx.Response] = {}
            # a streamed 64-token answer (> 3 s; a stream's deadline is its first piece) holds the one row
            long = threading.Thread(target=lambda: results.update(long=_chat(url, questions(1)[0], 64, True)))
            long.start()
            time.sleep(0.3)
            late = threading.Thread(target=lambda: results.update(late=_chat(url, questions(2)[1], 4)))
            late.start()
            time.sleep(0.2)
            results["full"] = _chat(url, questions(2)[1], 4)  # 2 waiting or generating: 503
            late.join()
            long.join()
    finally:
        slow.remove()
    assert freed == 0
    late, full = results["late"], results["full"]
    assert late.status_code == 504 and late.json()["error"]["limit"] == "request_timeout_s"
    assert full.status_code == 503 and full.json()["error"]["limit"] == "max_queue"
    assert int(full.headers["Retry-After"]) >= 1
    assert results["long"].status_code == 200 and _streamed(results["long"])


def test_stopping_the_server_drains_the_chat_answers_in_flight(chat_predictor):
    served = ServedModel(chat_predictor, "tiny-chat")
    expected = chat_predictor.answer(questions(1)[0], max_new_tokens=20)
    slow = chat_predictor.model.register_forward_pre_hook(lambda *a: time.sleep(0.03))  # an answer >= 0.6 s
    results: dict[str, Any] = {}
    try:
        server, state = _serve(served)
        with server as url:
            asking = [threading.Thread(target=lambda i=i: results.update({i: _chat(url, questions(1)[0], 20, i == 1)}))
                      for i in range(2)]
            for t in asking:
                t.start()
            while state.generator.waiting < 2:
                time.sleep(0.01)
        for t in asking:  # leaving the block stopped the server: it drained first (SIGTERM does the same)
            t.join()
    finally:
        slow.remove()
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["message"]["content"] == expected
    assert results[1].status_code == 200 and _streamed(results[1]) == expected
    assert state.generator.waiting == 0


def test_concurrent_translations_share_one_generate(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from workbench.tasks.seq2seq import Seq2SeqPredictor

    tok = word_tokenizer(chat=False)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, initializer_factor=5.0))
    predictor = Seq2SeqPredictor(model, tok, max_length=32, max_new_tokens=8, run_id="tiny-t5")
    texts = [" ".join(THINGS[i: i + 1 + i % 4]) for i in range(6)]
    alone = [predictor.predict([t], batch_size=1)[0]["translation"] for t in texts]
    calls: list[int] = []
    predict = predictor.predict
    predictor.predict = lambda texts, batch_size=16: calls.append(len(texts)) or predict(texts, batch_size)
    server, _ = _serve(ServedModel(predictor, "tiny-t5"), max_wait_ms=200)
    answers: list[Any] = [None] * 6
    with server as url:
        def ask(i: int) -> None:
            r = httpx.post(url + "/v1/translate", headers=AUTH, json={"texts": [texts[i]]}, timeout=60)
            answers[i] = r.json()["translations"][0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers == alone
    assert len(set(alone)) > 1 and max(calls) > 1  # requests grouped into one encoder-decoder generate


# --- the packaged model -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_batched_greedy_answers_equal_one_at_a_time(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.catalog import resolve_model

    try:
        source = resolve_model("smollm2-135m-instruct", tmp_path_factory.mktemp("home"))
    except Exception as exc:  # the asset is not installed
        pytest.skip(f"smollm2-135m-instruct is not available: {exc}")
    tok = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    predictor = ChatPredictor(model, tok, max_length=512, max_new_tokens=24, run_id="smollm2")
    served = ServedModel(predictor, "smollm2", task="chat")
    asked = [[{"role": "user", "content": q}] for q in (
        "What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
        "How many legs does a spider have? Answer in one sentence.")]
    expected = [predictor.answer(q, max_new_tokens=24) for q in asked]
    scheduler, steps = _scheduler(served, max_batch=4)

    async def run():
        scheduler.start()
        try:
            return await asyncio.gather(*[_answer(scheduler, served, q, 24) for q in asked])
        finally:
            scheduler.stop()

    results = asyncio.run(run())
    assert [r.text for _, r in results] == expected
    assert max(steps) == 4


def test_the_serve_command_sets_the_generation_batch_and_refuses_zero():
    from workbench.cli import _parser, serve_settings
    from workbench.errors import WorkbenchError

    assert serve_settings(_parser().parse_args(["serve", "r"])).max_generation_batch == 16
    assert serve_settings(_parser().parse_args(["serve", "r", "--max-generation-batch", "1"])).max_generation_batch == 1
    with pytest.raises(WorkbenchError, match="max_generation_batch"):
        serve_settings(_parser().parse_args(["serve", "r", "--max-generation-batch", "0"]))
