"""A causal LM as a classifier: label-token logits pinned against a direct computation, flat memory, step 0 equal
to the zero-shot prompt run, training, methods, predict, export and the ladder. A tiny Llama (hidden 32, 2 layers)
and a word-level tokenizer with a chat template, built here: no downloads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sentiment_rows
from test_zeroshot import tiny_tokenizer
from workbench.catalog import resolve_model
from workbench.config import Config
from workbench.data import prepare
from workbench.errors import WorkbenchError
from workbench.models.llm_classifier import LLMClassifier
from workbench.models.classifier import build_model, check_model_fits
from workbench.models.inspect import inspect_model
from workbench.loop import train
from workbench.tasks.classification import collate
from workbench.models.prompting import PromptBuilder, left_pad

LABELS = ["very good", "bad", "good", "pos"]  # multi-token, and two labels sharing a first token
TEXTS = ["great film", "the plot was awful and boring", "story",
         "a really wonderful film with lovely music and actors 7"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    """Weights drawn wider than a real init (std 0.2): the label scores differ, and LoRA learns in a few steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, architectures=["LlamaForCausalLM"], initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok, llama):
    out = tmp_path_factory.mktemp("tiny-llama-clf")
    llama.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def words_csv(tmp_path_factory):
    """The sentiment rows with labels of one and of two tokens ("very good" / "bad")."""
    path = tmp_path_factory.mktemp("llm-data") / "sentiment.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": "very good" if r["label"] == "pos" else "bad"}
                         for r in sentiment_rows(96))
    return path


@pytest.fixture
def llm_config(tiny_config, llama_dir, words_csv):
    def make(method: dict | None = None, **sections):
        return tiny_config(model=str(llama_dir), data={"source": str(words_csv)},
                           method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, **(method or {})},
                           **sections)
    return make


def _build(config: Config, total_steps: int | None = None):
    split = prepare(config.data, config.train.seed)
    return build_model(config, resolve_model(config.model, Path("."), False), split.labels, total_steps), split


def direct_logits(lm, prompts, continuations, scoring, virtual=None):
    """log p of each label token after the prompt and the label's earlier tokens: one unpadded full pass per pair."""
    out = torch.zeros(len(prompts), len(continuations), dtype=torch.float64)
    embed = lm.get_input_embeddings()
    for i, p in enumerate(prompts):
        for j, c in enumerate(continuations):
            ids = torch.tensor([p + c])
            if virtual is None:
                logits = lm(input_ids=ids).logits[0]
            else:
                logits = lm(inputs_embeds=torch.cat([virtual, embed(ids)], dim=1)).logits[0, virtual.shape[1]:]
            logp = torch.log_softmax(logits.double(), dim=-1)
            tokens = torch.stack([logp[len(p) - 1 + t, c[t]] for t in range(len(c))])
            out[i, j] = tokens[0] if scoring == "first" else tokens.sum() if scoring == "sum" else tokens.mean()
    return out


def _lora_llama(llama, kind: str):
    """The tiny Llama under a peft method whose adapters are not the identity, so they count."""
    import copy

    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    base = copy.deepcopy(llama)
    if kind == "lora":
        peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                               task_type="CAUSAL_LM"))
        torch.manual_seed(1)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    else:
        peft = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    return peft.eval()


# --- the label scores --------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", ["sum", "mean", "first"])
@pytest.mark.parametrize("kind", ["plain", "lora", "prompt-tuning"])
def test_label_logits_equal_a_direct_computation(tok, llama, scoring, kind):
    builder = PromptBuilder(tok, LABELS, 32, [])
    prompts = [builder.prompt_ids(t) for t in TEXTS]
    conts = builder.label_ids()
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths: the batch is padded"
    assert sorted({len(c) for c in conts}) == [1, 2], "single- and multi-token labels"
    lm = llama if kind == "plain" else _lora_llama(llama, kind)
    clf = LLMClassifier(lm, conts, scoring).eval()
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        got = clf(ids, mask).logits
        virtual = lm.get_prompt(batch_size=1) if kind == "prompt-tuning" else None
        expected = direct_logits(clf.causal_lm, prompts, conts, scoring, virtual)
    assert got.shape == (len(TEXTS), len(LABELS))
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "lora", "prompt-tuning"])
def test_label_logits_under_gradient_checkpointing_equal_a_direct_computation(tok, llama, kind):
    """Checkpointed training switches the key/value cache off: multi-token labels then run whole, same scores."""
    import copy

    from workbench.models.adapters import enable_gradient_checkpointing
    from workbench.models.prompting import _checkpointing  # noqa: PLC2701 - the scorer's own switch

    builder = PromptBuilder(tok, LABELS, 32, [])
    prompts, conts = [builder.prompt_ids(t) for t in TEXTS], builder.label_ids()
    lm = copy.deepcopy(llama) if kind == "plain" else _lora_llama(llama, kind)
    enable_gradient_checkpointing(lm)
    clf = LLMClassifier(lm, conts, "sum").train()  # no dropout in the tiny Llama: training mode is deterministic
    assert _checkpointing(clf)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    got = clf(ids, mask).logits
    with torch.no_grad():
        virtual = lm.get_prompt(batch_size=1) if kind == "prompt-tuning" else None
        expected = direct_logits(clf.causal_lm, prompts, conts, "sum", virtual)
    torch.testing.assert_close(got.detach().double(), expected, atol=1e-5, rtol=0)
    got.sum().backward()  # and it trains
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters() if p.requires_grad)


def test_the_loss_is_cross_entropy_over_the_label_scores_and_has_gradients(tok, llama):
    builder = PromptBuilder(tok, LABELS, 32, [])
    lm = _lora_llama(llama, "lora").train()
    clf = LLMClassifier(lm, builder.label_ids())
    ids, mask = left_pad([builder.prompt_ids(t) for t in TEXTS], tok.pad_token_id)
    y = torch.tensor([0, 1, 2, 3])
    out = clf(ids, mask, labels=y)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))
    out.loss.backward()
    grads = [p.grad for n, p in lm.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_more_left_padding_changes_nothing(tok, llama):
    builder = PromptBuilder(tok, LABELS, 32, [])
    clf = LLMClassifier(llama, builder.label_ids()).eval()
    ids, mask = left_pad([builder.prompt_ids(t) for t in TEXTS], tok.pad_token_id)
    pad = torch.full((len(TEXTS), 5), tok.pad_token_id)
    with torch.no_grad():
        tight = clf(ids, mask).logits
        loose = clf(torch.cat([pad, ids], 1), torch.cat([torch.zeros_like(pad), mask], 1)).logits
        alone = torch.cat([clf(ids[i:i + 1, -int(mask[i].sum()):], mask[i:i + 1, -int(mask[i].sum()):]).logits
                           for i in range(len(TEXTS))])
    torch.testing.assert_close(loose, tight, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, tight, atol=1e-5, rtol=0)


def test_right_padded_prompts_are_refused(tok, llama):
    builder = PromptBuilder(tok, LABELS, 32, [])
    ids, mask = left_pad([builder.prompt_ids(t) for t in TEXTS], tok.pad_token_id)
    right_ids, right_mask = ids.flip(1), mask.flip(1)  # any right padding: the last position is a pad
    with pytest.raises(ValueError, match="left-padded prompts"):
        LLMClassifier(llama, builder.label_ids())(right_ids, right_mask)


@pytest.mark.parametrize("training", [False, True])
def test_the_lm_head_never_sees_a_whole_sequence(tok, llama, training):
    """Memory stays flat: the LM head gets the last prompt position, or a label's own tokens, never the prompt."""
    builder = PromptBuilder(tok, LABELS, 32, [])
    prompts = [builder.prompt_ids(t) for t in TEXTS * 2]
    conts = builder.label_ids()
    seen: list[tuple[int, ...]] = []
    hook = llama.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    clf = LLMClassifier(llama, conts).train(training)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    try:
        with torch.set_grad_enabled(training):
            out = clf(ids, mask, labels=torch.zeros(len(prompts), dtype=torch.long))
            if training:
                out.loss.backward()
    finally:
        hook.remove()
        llama.zero_grad(set_to_none=True)
        llama.eval()
    longest_label = max(len(c) for c in conts)
    assert seen[0] == (len(prompts), 1, llama.config.hidden_size), "the prompt pass: one position per row"
    assert all(positions <= longest_label - 1 for _, positions, _ in seen[1:])
    assert ids.shape[1] > longest_label


# --- building, per method ---------------------------------------------------------------------------

def test_lora_trainable_count_is_pinned_and_inspect_agrees(llm_config):
    """hidden 32, intermediate 64, 4 heads of 8 with 2 key/value heads (k, v: 32 -> 16), 2 layers, r 4."""
    built, _ = _build(llm_config())
    assert isinstance(built.model, LLMClassifier) and built.head_modules == []
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))  # q k v o gate up down
    assert built.trainable_params == 2 * per_layer
    assert {t.rsplit(".", 1)[-1] for t in built.target_modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, "never the LM head"
    info = inspect_model(llm_config().model, method="lora", r=4, num_labels=2)
    assert info["trainable_parameters"] == built.trainable_params and info["head_modules"] == []


@pytest.mark.parametrize("method", [
    {"name": "full"}, {"name": "ia3"}, {"name": "adalora", "init_r": 6},
    {"name": "prompt-tuning", "num_virtual_tokens": 4}, {"name": "lora", "use_dora": True},
])
def test_other_methods_build_train_and_match_inspect(llm_config, method):
    config = llm_config(method)
    built, split = _build(config, total_steps=4)
    info = inspect_model(config.model, method=method["name"], r=4, num_labels=2,
                         init_r=method.get("init_r", 12), num_virtual_tokens=method.get("num_virtual_tokens", 20),
                         use_dora=method.get("use_dora", False))
    assert info["trainable_parameters"] == built.trainable_params > 0
    encodings = built.encode(split.train_texts[:8], config.train.max_length)
    batch = collate(built.tokenizer, encodings, list(range(8)), split.train_labels)
    built.model.train()
    built.model(**batch).loss.backward()
    trained = [p for p in built.model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_qlora_keeps_the_repack_off_and_trains(llm_config):
    bnb = pytest.importorskip("bitsandbytes")
    built, split = _build(llm_config({"name": "qlora"}))
    layers = [m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert not isinstance(built.model.causal_lm.lm_head, bnb.nn.Linear4bit), "the LM head stays unquantised"
    batch = collate(built.tokenizer, built.encode(split.train_texts[:8], 32), list(range(8)), split.train_labels)
    built.model.eval()
    with torch.no_grad():
        built.model(**batch)  # an eval pass first: bitsandbytes' 4-bit repack would zero LoRA gradients after it
    built.model.train()
    built.model(**batch).loss.backward()
    grads = [p.grad for n, p in built.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method, message", [
    ("head-only", r"^method head-only cannot train a causal LM \(LlamaForCausalLM\) as a classifier: .* "
                  r"no separate head to train\. Use lora"),
    ("prefix-tuning", r"^method prefix-tuning is not supported for a causal LM \(LlamaForCausalLM\) as a "
                      r"classifier: .*Use prompt-tuning"),
])
def test_methods_without_a_meaning_here_are_refused_in_one_line(llm_config, tmp_path, method, message):
    config = llm_config({"name": method})
    source = resolve_model(config.model, tmp_path, False)
    for check in (lambda: check_model_fits(config, source, 2), lambda: _build(config)):
        with pytest.raises(WorkbenchError, match=message) as err:
            check()
        assert "\n" not in str(err.value)
    assert inspect_model(config.model, method=method)["trainable_parameters"] is None


def test_a_bad_adapter_target_is_refused_before_loading(llm_config, tmp_path):
    config = llm_config({"target_modules": ["query"]})
    with pytest.raises(WorkbenchError, match=r"method.target_modules: 'query' is not a linear layer of this model; "
                                             r"valid names: down_proj, gate_proj, k_proj"):
        check_model_fits(config, resolve_model(config.model, tmp_path, False), 2)


# --- prompts --------------------------------------------------------------------------------------------

def test_a_long_text_is_cut_and_the_instruction_and_answer_cue_stay(llm_config, tok):
    built, _ = _build(llm_config())
    assert built.tokenizer.padding_side == "left"
    short, long = built.encode(["great film", " ".join(["story"] * 500) + " awful"], max_length=8)
    cue = tok("<|im_end|> <|im_start|> assistant", add_special_tokens=False)["input_ids"]
    for enc in (short, long):
        assert enc["input_ids"][-len(cue):] == cue and enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert len(long["input_ids"]) - len(short["input_ids"]) == 8 - 2, "the text alone is cut, to 8 tokens"
    text = tok.decode(long["input_ids"])
    assert "awful" not in text and "the category only." in text
    batch = collate(built.tokenizer, [short, long], [0, 1], None)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0], "padded on the left"


def test_a_prompt_beyond_the_context_is_refused(llm_config, tmp_path):
    built, _ = _build(llm_config())
    built.max_length_limit = 40
    with pytest.raises(WorkbenchError, match=r"a prompt is \d+ tokens with its label, beyond the model's limit of "
                                             r"40: lower train.max_length \(now 32"):
        built.encode(["great film " * 20], 32)


# --- runs -------------------------------------------------------------------------------------------

def test_step_zero_is_the_zero_shot_prompt_run(llm_config, store):
    """Before any step the classifier predicts what the zero-shot-prompt run of the same model predicted."""
    zero = train(llm_config({"name": "zero-shot-prompt", "r": 8, "alpha": 16, "dropout": 0.1}), store=store)
    assert zero["status"] == "completed", zero["error"]
    rows = json.loads(Path(zero["metrics"]["predictions_file"]).read_text())["rows"]
    config = llm_config()
    built, split = _build(config)
    encodings = built.encode(split.eval_texts, config.train.max_length)
    built.model.eval()
    with torch.no_grad():
        probs = torch.softmax(built.model(**collate(built.tokenizer, encodings, list(range(len(encodings))),
                                                    None)).logits, dim=-1)
    assert [split.labels[i] for i in probs.argmax(-1)] == [r["predicted"] for r in rows]
    np.testing.assert_allclose(probs.max(-1).values.numpy(), [r["confidence"] for r in rows], atol=1e-5)


def test_training_lowers_the_loss_and_the_run_predicts_and_exports(llm_config, store, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.export import EXPORT_INFO, export_run
    from workbench.predict import load_predictor
    from workbench.models.prompting import score_labels

    config = llm_config(train={"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "eval_every": 9})
    record = train(config, store=store)
    assert record["status"] == "completed", record["error"]
    steps = store.points(record["id"], kind="train")
    evals = store.points(record["id"], kind="eval")
    assert len(steps) == 18 and evals[-1]["eval_loss"] < 0.1 * steps[0]["loss"]
    assert record["metrics"]["accuracy"] >= 0.9
    assert np.asarray(record["metrics"]["confusion_matrix"]).sum() == record["info"]["eval_rows"] == 24
    assert record["info"]["trainable_params"] == 4096 and record["info"]["head_modules"] == []

    texts = ["great great wonderful film", "awful awful terrible plot", "story"]
    rows = load_predictor(record["id"], store.home, calibrated=False).predict(texts)
    assert [r["label"] for r in rows[:2]] == ["very good", "bad"]
    predicted = np.array([[r["scores"][y] for y in ("bad", "very good")] for r in rows])

    merged = export_run(record["id"], merge=True, home=store.home)
    info = json.loads((merged / EXPORT_INFO).read_text())
    assert info["merged"] and "AutoModelForCausalLM" in info["load"] and info["classifier"]["scoring"] == "sum"
    lm = AutoModelForCausalLM.from_pretrained(merged)
    assert type(lm).__name__ == "LlamaForCausalLM"
    adapter = export_run(record["id"], out=tmp_path / "adapter", home=store.home)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(info["base_model"]), adapter)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    builder = PromptBuilder(tokenizer, info["labels"], info["classifier"]["text_max_tokens"], [])
    conts = [info["classifier"]["label_token_ids"][y] for y in info["labels"]]
    for model in (lm, unmerged):
        scores = score_labels(model, [builder.prompt_ids(t) for t in texts], conts, "sum",
                              pad_id=tokenizer.pad_token_id)
        np.testing.assert_allclose(torch.softmax(torch.from_numpy(scores), -1).numpy(), predicted, atol=1e-5)


def test_a_ladder_runs_prompting_then_lora_on_the_causal_lm(llm_config, store):
    from workbench.ladder import create_ladder, run_ladder

    config = llm_config(train={"epochs": 1})
    ladder = run_ladder(config, ["zero-shot-prompt", "lora"], home=store.home, echo=False)
    assert [r["status"] for r in ladder["rows"]] == ["completed", "completed"]
    assert [r["model"] for r in ladder["rows"]] == [config.model, config.model]
    with pytest.raises(WorkbenchError, match=r"ladder rung head-only: method head-only cannot train a causal LM"):
        create_ladder(config, ["lora", "head-only"], home=store.home)
