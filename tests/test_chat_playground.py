"""ChatPlayground, headless: pick a chat run, ask, watch the answer arrive in pieces, stop, errors inline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import traitlets as T

from test_chat import chat_config, qa_jsonl, tiny_chat_dir  # noqa: F401  (fixtures)
from workbench.store import RunStore
from workbench.loop import train


def wait_idle(play, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while play.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not play.busy, "the answer never finished"


@pytest.fixture(scope="module")
def chat_home(tmp_path_factory, tiny_chat_dir, qa_jsonl):  # noqa: F811
    """A workspace with one tuned chat run and one classification-shaped run without a model."""
    from workbench.config import Config

    home = tmp_path_factory.mktemp("chat-home")
    store = RunStore(home)
    config = Config.from_dict({
        "task": "chat", "model": str(tiny_chat_dir), "name": "tiny-chat",
        "data": {"source": str(qa_jsonl), "eval_fraction": 0.2},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 3e-2, "max_length": 48, "warmup_ratio": 0.0,
                  "early_stopping_patience": 0, "threads": 1},
        "chat": {"max_new_tokens": 12, "sample_prompts": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})
    record = train(config, store=store)
    assert record["status"] == "completed", record["error"]
    store.create_run(Config().to_dict(), "a classifier")  # no model, not a chat run: never offered
    return home, record


def test_an_answer_streams_in_pieces_on_a_worker_thread(chat_home):
    from widgets.chat_playground import ChatPlayground

    home, record = chat_home
    play = ChatPlayground(home=home)
    assert play.runs == [record["id"]] and play.run_id == record["id"]
    assert "tiny-chat" in play._run.options[0][0]
    seen: list[str] = []
    play.observe(lambda change: seen.append(change["new"]), names="answer")
    question = record["metrics"]["samples"][0]["question"]
    play._question.value = question  # as a user types
    play._tokens.value = 12
    play._ask.click()
    assert play.busy and play._ask.disabled and not play._stop.disabled, "the kernel is free while it answers"
    wait_idle(play)
    pieces = [s for s in seen if s]
    assert len(pieces) > 1, f"the answer must arrive in pieces, got {pieces}"
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:])), "each piece extends the answer"
    assert play.answer.strip() == record["metrics"]["samples"][0]["answer"], "greedy, as the run's evaluation"
    assert play.error == "" and play.status == "" and not play._ask.disabled and play._stop.disabled
    assert "<b>A:</b>" in play._output.value and play.answer.split()[0] in play._output.value


def test_stop_ends_the_answer_early(chat_home):
    from widgets.chat_playground import ChatPlayground

    home, record = chat_home
    play = ChatPlayground(home=home)
    play.max_new_tokens = 40
    full_answer = play.model(record["id"]).answer("what colour is the sky 3 ?", max_new_tokens=40)
    play.observe(lambda change: play._stop.click() if change["new"] else None, names="answer")  # Stop at once
    play.ask("what colour is the sky 3 ?")
    wait_idle(play)
    assert play.status == "stopped" and play.error == ""
    assert len(play.answer.split()) < max(len(full_answer.split()), 2)


def test_errors_are_inline_never_a_traceback(chat_home, tmp_path):
    from widgets.chat_playground import ChatPlayground

    empty = ChatPlayground(home=tmp_path / "empty", background=False)
    assert empty.runs == [] and empty.run_id == ""
    empty._ask.click()
    assert "no chat run with a trained model yet" in empty.error
    with pytest.raises(T.TraitError):
        empty.run_id = "nonexistent"
    with pytest.raises(T.TraitError):
        empty.max_new_tokens = 0

    home, record = chat_home
    play = ChatPlayground(home=home, background=False)
    play.ask("   ")
    assert play.error == "type a question"
    play.ask("x" * 5000)
    assert "at most 4,000" in play.error

    class Broken:
        task = "chat"

        def stream(self, *args, **kwargs):
            yield "half an "
            raise RuntimeError("the model fell over")

    play._models[record["id"]] = Broken()
    play.ask("what colour is the sea 1 ?")
    assert play.error == "generation failed (RuntimeError: the model fell over)" and not play.busy
    assert play.answer == "half an " and "Traceback" not in play._error_html.value


def test_the_package_exports_it():
    import ipywidgets as W

    from widgets import ChatPlayground

    assert issubclass(ChatPlayground, W.VBox)
    assert Path(__file__).resolve().parent.parent.joinpath("widgets", "chat_playground.py").is_file()


def test_loss_curve_follows_a_chat_run(chat_home):
    """A chat run's store points are what LossCurve reads: train loss per step, held-out loss per evaluation."""
    from widgets import LossCurve

    home, record = chat_home
    curve = LossCurve(home=home, run_ids=[record["id"]], background=False)
    hist = curve.history(record["id"])
    assert hist.train_steps == list(range(1, 25)) and hist.eval_steps == [0, 8, 16, 24]
    assert all(isinstance(v, float) for v in hist.eval_loss) and hist.eval_loss[-1] < hist.eval_loss[0]
    assert hist.accuracy == [None] * 4, "a chat run has no accuracy: the curve leaves it out"
    assert hist.best_step == record["metrics"]["best_step"] and hist.status == "completed"
