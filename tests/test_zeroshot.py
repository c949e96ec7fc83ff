"""Zero-shot baselines: label-token scoring pinned against a direct computation, flat memory, runs in the store,
bad input. A tiny Llama and a word-level tokenizer with a chat template are built here: no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FILLER, NEGATIVE, POSITIVE
from workbench.callbacks import Callback
from workbench.config import Config, MethodConfig
from workbench.errors import WorkbenchError
from workbench.models.prompting import (INSTRUCTION, PromptBuilder, check_label_tokens, few_shot_indices, mean_pool,
                                        score_labels)
from workbench.tasks.zeroshot import check_zero_shot

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
WORDS = (["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "answer", "answer:", "text:",
          "classify", "the", "text", "into", "one", "of", "these", "categories:", "category", "only.", "with",
          "pos", "neg", "pos,", "neg.", "very", "good", "bad", "good."]
         + sorted(set(FILLER + POSITIVE + NEGATIVE)) + [str(i) for i in range(100)])


def tiny_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(len(tok))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tok, llama):
    out = tmp_path_factory.mktemp("tiny-llama")
    llama.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def direct_scores(model, prompts, continuations, scoring):
    """log p of each label token given the prompt and the label's earlier tokens, one unpadded pass per pair."""
    out = np.zeros((len(prompts), len(continuations)))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, c in enumerate(continuations):
                logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), dim=-1)
                tokens = [logp[len(p) - 1 + t, c[t]].item() for t in range(len(c))]
                out[i, j] = tokens[0] if scoring == "first" else sum(tokens) if scoring == "sum" else np.mean(tokens)
    return out


TEXTS = ["great film", "the plot was awful and boring", "story", "a really wonderful film with lovely music and actors"]
LABELS = ["very good", "bad", "good", "pos"]  # multi-token, shared first token ("good" vs "good.")


@pytest.mark.parametrize("scoring", ["mean", "sum", "first"])
def test_label_scores_match_a_direct_computation(tok, llama, scoring):
    builder = PromptBuilder(tok, LABELS, 32, [])
    prompts = [builder.prompt_ids(t) for t in TEXTS]
    conts = builder.label_ids()
    assert sorted({len(p) for p in prompts}) != [len(prompts[0])], "prompts of different lengths: padding is tested"
    assert max(len(c) for c in conts) == 2
    got = score_labels(llama, prompts, conts, scoring, batch_size=3, pad_id=tok.pad_token_id)
    np.testing.assert_allclose(got, direct_scores(llama, prompts, conts, scoring), atol=1e-5)


def test_scoring_memory_is_flat_and_batch_size_changes_nothing(tok, llama):
    builder = PromptBuilder(tok, LABELS, 32, [])
    prompts = [builder.prompt_ids(t) for t in TEXTS * 3]
    conts = builder.label_ids()
    seen: list[tuple[int, ...]] = []
    hook = llama.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        small = score_labels(llama, prompts, conts, "mean", batch_size=2, pad_id=tok.pad_token_id)
        shapes_small = list(seen)
        seen.clear()
        whole = score_labels(llama, prompts, conts, "mean", batch_size=len(prompts), pad_id=tok.pad_token_id)
    finally:
        hook.remove()
    np.testing.assert_allclose(small, whole, atol=1e-5)
    longest_label = max(len(c) for c in conts)
    # never (batch x prompt length x vocab): the prompt pass keeps one position, a label pass its own tokens
    assert all(rows <= 2 and positions <= max(1, longest_label - 1) for rows, positions, _ in shapes_small)
    assert all(positions < min(len(p) for p in prompts) for _, positions, _ in seen)


def test_few_shot_rows_take_labels_in_turn_and_follow_the_seed():
    labels = [0] * 10 + [1] * 10 + [2] * 3
    picked = few_shot_indices(labels, 5, seed=7)
    assert len(set(picked)) == 5
    counts = np.bincount([labels[i] for i in picked], minlength=3)
    assert counts.min() >= 1 and counts.max() <= 2, "every label once before any label twice"
    assert picked == few_shot_indices(labels, 5, seed=7)
    assert picked != few_shot_indices(labels, 5, seed=8)
    assert few_shot_indices(labels, 0, seed=7) == []


def test_prompt_builder_chat_turns_and_plain_fallback(tok):
    chat = PromptBuilder(tok, ["pos", "neg"], 3, [("great film", "pos")])
    text = chat.prompt("the film was really quite awful")
    assert text.count("<|im_start|> user") == 2 and "<|im_start|> assistant pos <|im_end|>" in text
    assert text.endswith("<|im_start|> assistant ")
    assert "Text: the film was\n" in text, "the text is cut to max_length tokens"
    assert chat.label_ids() == [[tok.convert_tokens_to_ids("pos")], [tok.convert_tokens_to_ids("neg")]]
    plain = PromptBuilder(tiny_tokenizer(chat=False), ["pos", "neg"], 32, [("great film", "pos")])
    assert not plain.chat
    prompt = plain.prompt("awful")
    assert prompt.endswith(INSTRUCTION.format(labels="pos, neg", text="awful") + "\nAnswer:")
    assert "\nAnswer: pos\n\n" in prompt


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 0.0]]))


class Recorder(Callback):
    def __init__(self, stop_at_begin: bool = False) -> None:
        self.events: list[str] = []
        self.stop_at_begin = stop_at_begin

    def on_train_begin(self, state, config):
        self.events.append("train_begin")

    def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
        self.events.append("step_end")

    def on_evaluate(self, state, control, result):
        self.events.append("evaluate")
        if self.stop_at_begin:
            raise AssertionError("a stopped zero-shot run must not evaluate")

    def on_checkpoint(self, state, path, is_best):
        self.events.append("checkpoint")

    def on_exception(self, state, message):
        self.events.append("exception")

    def on_train_end(self, state, status, metrics):
        self.events.append(f"train_end:{status}")


def test_embedding_zero_shot_on_tiny_bert_is_a_completed_run(tiny_config, store):
    from workbench.loop import train

    config = tiny_config(method={"name": "zero-shot-embedding", "label_template": "a {label} film"})
    recorder = Recorder()
    record = train(config, store=store, callbacks=[recorder])
    assert record["status"] == "completed", record["error"]
    assert recorder.events == ["train_begin", "evaluate", "train_end:completed"]
    m, info, t = record["metrics"], record["info"], record["timings"]
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["f1_macro"] <= 1.0 and m["best_step"] == 0
    assert np.asarray(m["confusion_matrix"]).sum() == info["eval_rows"] == 24
    assert info["trainable_params"] == 0 and info["total_params"] > 0 and info["trainable_percent"] == 0
    assert info["zero_shot"]["label_texts"] == ["a neg film", "a pos film"]
    assert t["steps"] == 0 and t["train_seconds"] == 0 and t["wall_seconds"] > 0 and t["peak_memory_mb"] > 0
    (point,) = store.points(record["id"], kind="eval")
    assert point["step"] == 0 and point["is_best"] and "mistakes" in point and point["accuracy"] == m["accuracy"]
    preds = json.loads(Path(m["predictions_file"]).read_text())
    assert Path(m["predictions_file"]).name == "step-0.json" and len(preds["rows"]) == 24
    assert preds["labels"] == ["neg", "pos"]


def test_prompt_zero_shot_few_shot_on_tiny_llama_is_a_completed_run(tiny_config, store, tiny_llama_dir):
    from workbench.loop import train

    config = tiny_config(model=str(tiny_llama_dir), method={"name": "zero-shot-prompt", "few_shot_k": 2,
                                                              "prompt_scoring": "sum"})
    record = train(config, store=store)
    assert record["status"] == "completed", record["error"]
    zs = record["info"]["zero_shot"]
    assert zs["prompt_format"] == "chat template" and zs["few_shot_k"] == 2 and len(zs["few_shot_rows"]) == 2
    assert zs["example_prompt"].count("<|im_start|> user") == 3
    assert record["info"]["trainable_params"] == 0 and record["metrics"]["accuracy"] is not None


def test_calibration_divides_out_the_prompts_label_prior():
    from workbench.models.prompting import calibrate

    # the prompt alone favours label 0 (0.8 vs 0.2); a text with p = (0.6, 0.4) is really evidence for label 1
    free = np.log(np.array([[0.8, 0.2], [0.8, 0.2]]))
    scores = np.log(np.array([[0.6, 0.4], [0.95, 0.05]])) + 3.0  # any offset: scores are log-probabilities
    calibrated, prior = calibrate(scores, free)
    np.testing.assert_allclose(prior, [0.8, 0.2])
    assert calibrated.argmax(1).tolist() == [1, 0] and scores.argmax(1).tolist() == [0, 0]
    probs = np.exp(calibrated) / np.exp(calibrated).sum(1, keepdims=True)
    np.testing.assert_allclose(probs[0], np.array([0.6 / 0.8, 0.4 / 0.2]) / (0.6 / 0.8 + 0.4 / 0.2))


def test_calibrated_prompt_run_records_its_prior_and_changes_only_the_bias(tiny_config, store, tiny_llama_dir):
    from workbench.loop import train

    base = {"name": "zero-shot-prompt", "prompt_scoring": "sum"}
    plain = train(tiny_config(model=str(tiny_llama_dir), method=base), store=store)
    calibrated = train(tiny_config(model=str(tiny_llama_dir), method={**base, "prompt_calibration": True}),
                       store=store)
    assert calibrated["status"] == "completed", calibrated["error"]
    info = calibrated["info"]["zero_shot"]["calibration"]
    assert info["content_free"] == ["N/A", "", "[MASK]"] and set(info["label_prior"]) == {"neg", "pos"}
    assert abs(sum(info["label_prior"].values()) - 1) < 1e-3 and plain["info"]["zero_shot"]["calibration"] is None
    rows = [json.loads(Path(r["metrics"]["predictions_file"]).read_text())["rows"] for r in (plain, calibrated)]
    prior = np.array([info["label_prior"]["neg"], info["label_prior"]["pos"]])
    def probs(row: dict) -> np.ndarray:  # two labels: the predicted one's confidence gives both
        pos = row["confidence"] if row["predicted"] == "pos" else 1 - row["confidence"]
        return np.array([1 - pos, pos])

    for a, b in zip(*rows):  # per text: calibrated probabilities = plain ones / prior, renormalised
        p = probs(a) / prior
        np.testing.assert_allclose(p / p.sum(), probs(b), atol=2e-3)


def test_a_stop_before_the_evaluation_ends_the_run_stopped(tiny_config, store):
    from workbench.loop import train

    class StopAtBegin(Recorder):
        def on_train_begin(self, state, config):
            super().on_train_begin(state, config)
            store.request_stop(state.run_id)  # as `workbench runs stop` would, from another process

    recorder = StopAtBegin(stop_at_begin=True)
    record = train(tiny_config(method={"name": "zero-shot-embedding"}), store=store, callbacks=[recorder])
    assert record["status"] == "stopped" and record["metrics"] is None
    assert recorder.events == ["train_begin", "train_end:stopped"]


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"label_template": "about the topic"}, r"method.label_template = 'about the topic' is not allowed: text with "
                                            r"\{label\}"),
    ({"label_template": "{label} and {other}"}, r"method.label_template = .* no other \{...\} field"),
    ({"label_template": "{{label}}"}, r"method.label_template = '\{\{label\}\}' is not allowed"),
    ({"name": "zero-shot-prompt", "few_shot_k": -1}, r"method.few_shot_k = -1 is not allowed: 0 \(zero-shot\)"),
    ({"name": "zero-shot-embedding", "few_shot_k": 3}, r"method.few_shot_k = 3 is not allowed: 0 for "
                                                       r"zero-shot-embedding"),
    ({"name": "zero-shot-prompt", "prompt_scoring": "max"}, r"method.prompt_scoring = 'max' is not allowed: "
                                                            r"expected one of 'sum', 'mean', 'first'"),
    ({"name": "lora", "prompt_calibration": True}, r"method.prompt_calibration = True is not allowed: false for "
                                                   r"lora; calibration is an option of zero-shot-prompt"),
])
def test_bad_zero_shot_settings_name_the_field(fields, message):
    with pytest.raises(WorkbenchError, match=message):
        Config.from_dict({"method": fields})


def test_zero_shot_methods_are_not_peft_and_the_config_round_trips():
    method = MethodConfig(name="zero-shot-prompt", few_shot_k=4, prompt_scoring="first")
    assert method.is_zero_shot and not method.uses_peft and not method.uses_adapters
    config = Config(method=method)
    assert Config.from_dict(config.to_dict()) == config


def test_model_of_the_wrong_kind_is_refused_with_the_fix(tiny_config, tiny_llama_dir, tmp_path):
    embed_on_llama = tiny_config(model=str(tiny_llama_dir), method={"name": "zero-shot-embedding"})
    with pytest.raises(WorkbenchError, match=r"method zero-shot-embedding needs an encoder such as minilm-l6: model "
                                             r".* is a causal language model \(LlamaForCausalLM\).*Use method "
                                             r"zero-shot-prompt for it"):
        check_zero_shot(embed_on_llama, tmp_path)
    prompt_on_bert = tiny_config(method={"name": "zero-shot-prompt"})
    with pytest.raises(WorkbenchError, match=r"method zero-shot-prompt needs a causal language model such as "
                                             r"smollm2-135m-instruct: model .* is BertModel.*Use method "
                                             r"zero-shot-embedding for it"):
        check_zero_shot(prompt_on_bert, tmp_path)


def test_a_refused_model_fails_the_run_with_the_message(tiny_config, tiny_llama_dir, store):
    from workbench.loop import train

    record = train(tiny_config(model=str(tiny_llama_dir), method={"name": "zero-shot-embedding"}), store=store)
    assert record["status"] == "failed" and record["error"].startswith("method zero-shot-embedding needs an encoder")


def test_more_shots_than_training_rows_is_refused(tiny_config, tiny_llama_dir, tmp_path):
    from workbench.data import prepare

    config = tiny_config(model=str(tiny_llama_dir), method={"name": "zero-shot-prompt", "few_shot_k": 500})
    with pytest.raises(WorkbenchError, match=r"method.few_shot_k = 500 is more than the 72 training rows: lower it "
                                             r"or raise data.max_train_samples"):
        check_zero_shot(config, tmp_path, prepare(config.data, config.train.seed))


def test_labels_a_prompt_cannot_tell_apart_are_refused():
    with pytest.raises(WorkbenchError, match=r"labels 'a' and 'b' have the same tokens for this tokenizer"):
        check_label_tokens(["a", "b"], [[5], [5]], "mean")
    with pytest.raises(WorkbenchError, match=r"method.prompt_scoring = 'first' cannot tell labels 'good' and "
                                             r"'good deal' apart: they start with the same token. Use 'mean'"):
        check_label_tokens(["good", "good deal"], [[5], [5, 6]], "first")
    check_label_tokens(["good", "good deal"], [[5], [5, 6]], "mean")  # fine when every token counts
