"""Config: typed construction, YAML round trips, overrides and the messages users read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from workbench.config import ChatConfig, Config, DataConfig, MethodConfig, TrackConfig, TrainConfig
from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_round_trip_through_dict_and_yaml(tmp_path):
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == cfg


def test_the_readme_config_loads_as_written():
    cfg = Config.load(ROOT / "configs" / "bbc-lora.yaml")
    assert cfg.model == "minilm-l6" and cfg.data.source == "bbc-news"
    assert cfg.method.name == "lora" and cfg.method.target_modules == "auto"
    assert cfg.train.learning_rate == pytest.approx(5e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.early_stopping_patience == 2 and cfg.track.wandb == "offline"
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```yaml", 1)[1].split("```", 1)[0]
    assert Config.from_dict(yaml.safe_load(block)) == cfg, "README config and configs/bbc-lora.yaml diverged"


def test_overrides_are_parsed_as_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("model: minilm-l6\n")
    cfg = Config.load(tmp_path / "c.yaml", ["train.epochs=3", "method.target_modules=[query,value]",
                                            "train.learning_rate=2e-5", "data.max_train_samples=100"])
    assert cfg.train.epochs == 3
    assert cfg.method.target_modules == ["query", "value"]
    assert cfg.train.learning_rate == pytest.approx(2e-5)
    assert cfg.data.max_train_samples == 100


@pytest.mark.parametrize("raw, match", [
    ({"trian": {}}, r"unknown config key 'trian': did you mean 'train'\?"),
    ({"train": {"epoch": 2}}, r"unknown config key 'train.epoch': did you mean 'epochs'\?"),
    ({"method": {"name": "lorra"}}, r"method.name = 'lorra' is not allowed: expected one of 'full', 'head-only'"),
    ({"method": {"r": 0}}, r"method.r = 0 is not allowed: a LoRA rank >= 1"),
    ({"method": {"r": -4}}, r"method.r = -4"),
    ({"train": {"learning_rate": 0}}, r"train.learning_rate = 0.0 is not allowed: a positive number"),
    ({"train": {"learning_rate": -1e-3}}, r"train.learning_rate = -0.001"),
    ({"train": {"epochs": 0}}, r"train.epochs = 0 is not allowed: at least 1"),
    ({"train": {"batch_size": 0}}, r"train.batch_size = 0"),
    ({"train": {"epochs": 1.5}}, r"train.epochs = 1.5 is not allowed: expected a whole number"),
    ({"train": {"epochs": "three"}}, r"train.epochs = 'three' is not allowed: expected a whole number"),
    ({"train": {"warmup_ratio": 1.0}}, r"train.warmup_ratio = 1.0"),
    ({"data": {"eval_fraction": 0}}, r"data.eval_fraction = 0.0 is not allowed: a fraction strictly between"),
    ({"method": {"dropout": 1.0}}, r"method.dropout = 1.0"),
    ({"method": {"target_modules": []}}, r"method.target_modules = \[\]"),
    ({"track": {"wandb": "yes"}}, r"track.wandb = 'yes' is not allowed: expected one of 'offline'"),
    ({"method": {"train_head": "yes"}}, r"method.train_head = 'yes' is not allowed: expected true or false"),
    ({"data": "bbc-news"}, r"data. must be a mapping"),
    ({"train": {"seed": -1}}, r"train.seed = -1 is not allowed: a whole number from 0 to 4294967295"),
    ({"train": {"device": "tpu"}}, r"train.device = 'tpu' is not allowed: expected one of 'auto', 'cpu'"),
    ({"train": {"class_weights": "inverse"}}, r"train.class_weights = 'inverse' is not allowed: expected one of"),
    ({"data": {"source": "  "}}, r"data.source = '  ' is not allowed: a catalog dataset name or a file path"),
    ({"data": {"source": "a\x00b"}}, r"data.source = 'a\\x00b' is not allowed"),
    ({"task": "chat", "train": {"class_weights": "balanced"}}, r"train.class_weights = 'balanced' is not allowed: "
                                                                r"auto \(the default\) for task: chat"),
    ({"task": "translation"}, r"task = 'translation' is not allowed: expected one of 'text-classification', 'text-regression', 'token-classification', 'chat'"),
    ({"task": "chat", "method": {"name": "ia3"}}, r"method.name = 'ia3' is not allowed: one of full, lora, qlora "
                                                  r"for task: chat"),
    ({"task": "chat", "data": {"label_column": "a"}}, r"data.label_column = 'a' is not allowed: nothing for task: "
                                                      r"chat, which reads data.prompt_column and data.answer_column"),
    ({"data": {"prompt_column": "q"}}, r"data.prompt_column = 'q' is not allowed: nothing for task: "
                                       r"text-classification, which reads data.text_column and data.label_column"),
    ({"chat": {"sample_prompts": 5}}, r"chat.sample_prompts = 5 is not allowed: the default for task: "
                                      r"text-classification"),
    ({"task": "chat", "chat": {"sample_prompts": -1}}, r"chat.sample_prompts = -1 is not allowed: 0 \(none\) to 20"),
    ({"task": "chat", "chat": {"max_new_tokens": 0}}, r"chat.max_new_tokens = 0 is not allowed: 1 to 2048 tokens"),
    ({"task": "chat", "data": {"messages_column": "m", "prompt_column": "q"}},
     r"data.messages_column = 'm' is not allowed: either a messages column or prompt/answer columns"),
    ({"task": "chat", "data": {"answer_column": " "}}, r"data.answer_column = ' ' is not allowed: a column name"),
    ({"task": "seq2seq", "method": {"name": "head-only"}}, r"method.name = 'head-only' is not allowed: one of full, "
                                                          r"lora, qlora for task: seq2seq"),
    ({"task": "seq2seq", "data": {"text_column": "en"}}, r"data.text_column = 'en' is not allowed: nothing for task: "
                                                         r"seq2seq, which reads data.prompt_column and data.answer_column"),
    ({"task": "seq2seq", "chat": {"max_new_tokens": 0}}, r"chat.max_new_tokens = 0 is not allowed: 1 to 2048"),
])
def test_bad_values_name_the_field_and_the_fix(raw, match):
    with pytest.raises(WorkbenchError, match=match):
        Config.from_dict(raw)


@pytest.mark.parametrize("cls", [DataConfig, MethodConfig, TrainConfig, TrackConfig, ChatConfig, Config])
def test_every_section_round_trips_and_documents_its_fields(cls):
    obj = cls()
    assert cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}) == obj
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), "every field needs help text"


def test_no_silent_type_changes():
    cfg = Config.from_dict({"train": {"learning_rate": 1, "epochs": 2.0}})
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    with pytest.raises(WorkbenchError, match="expected a whole number"):
        Config.from_dict({"train": {"epochs": True}})


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(WorkbenchError, match="not found"):
        Config.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(WorkbenchError, match="not valid YAML"):
        Config.load(tmp_path / "bad.yaml")
    with pytest.raises(WorkbenchError, match="must look like section.key=value"):
        Config().with_overrides(["epochs"])


def test_the_chat_config_loads_and_round_trips():
    cfg = Config.load(ROOT / "configs" / "chat-lora.yaml")
    assert cfg.task == "chat" and cfg.model == "smollm2-135m-instruct" and cfg.data.source == "chatterbot"
    assert cfg.method.name == "lora" and cfg.chat.eval_at_start
    assert Config.from_dict(cfg.to_dict()) == cfg
    classification = Config.load(ROOT / "configs" / "bbc-lora.yaml")
    assert classification.task == "text-classification" and classification.chat == ChatConfig()
