"""MethodPanel with every core method: the sub-panels' controls, to_config / from_config, the live
readout against inspect_model, the prefix-tuning refusal inline, and the registry's fallback.

Headless, without a browser: build with background=False, set controls and traits, assert on traits and HTML.
The model is conftest's tiny 2-layer BERT (`tiny_model_dir`), read as a config only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ipywidgets as W  # noqa: E402
import traitlets as T  # noqa: E402

from workbench import MethodConfig, WorkbenchError  # noqa: E402
from workbench.config import METHODS  # noqa: E402


@pytest.fixture
def panel(tmp_path: Path, tiny_model_dir: Path):
    from widgets import MethodPanel

    # the model is given at construction, so the first estimate is already the tiny one's
    return MethodPanel(home=tmp_path / "home", background=False, model=str(tiny_model_dir))


def control(panel: Any, description: str) -> W.Widget:
    """The control with this description in the shown sub-panel (what a user sees and clicks)."""
    def walk(widget: W.Widget):
        yield widget
        for child in getattr(widget, "children", ()):
            yield from walk(child)

    hits = [w for w in walk(panel._body) if getattr(w, "description", None) == description]
    assert len(hits) == 1, f"{description!r} in the {panel.method} sub-panel: {len(hits)} found"
    return hits[0]


def direct_count(model: Path, home: Path, **kwargs: Any) -> int | None:
    from workbench.models.inspect import inspect_model

    return inspect_model(str(model), home, **kwargs)["trainable_parameters"]


def test_every_core_method_is_offered_in_core_order(panel: Any) -> None:
    assert panel._method.options == tuple(METHODS)
    for name in METHODS:
        panel._method.value = name  # the selector
        assert panel.method == name and len(panel._body.children) == 1
    with pytest.raises(T.TraitError):
        panel.method = "prefix"


# each case: method, {control description: value}, {trait: value} set directly, the expected MethodConfig
CASES = [
    ("lora", {"Rank r": 4, "Alpha": 8.0, "Dropout": 0.05,
              "rsLoRA: scale by alpha / sqrt(r) (steadier at high rank)": True,
              "train the head (classifier, pooler, new layers)": False},
     {"target_modules": ["query", "value"]},
     MethodConfig(name="lora", r=4, alpha=8.0, dropout=0.05, use_rslora=True, target_modules=["query", "value"],
                  train_head=False)),
    ("qlora", {"DoRA: also train a magnitude per output feature": True, "4-bit type": "fp4",
               "double quantisation": False},
     {},
     MethodConfig(name="qlora", use_dora=True, quant_type="fp4", double_quant=False)),
    ("adalora", {"Start rank init_r": 16, "Average rank r": 6, "Warm-up share": 0.2, "Final share": 0.3,
                 "Alpha": 12.0, "Dropout": 0.0},
     {"target_modules": ["query", "key"]},
     MethodConfig(name="adalora", init_r=16, r=6, rank_warmup_ratio=0.2, rank_final_ratio=0.3, alpha=12.0,
                  dropout=0.0, target_modules=["query", "key"])),
    ("ia3", {"train the head (classifier, pooler, new layers)": False}, {},
     MethodConfig(name="ia3", train_head=False)),
    ("ia3", {"with none selected: every linear layer (all-linear) instead of auto": True}, {},
     MethodConfig(name="ia3", target_modules="all-linear")),
    ("prompt-tuning", {"Virtual tokens": 7}, {}, MethodConfig(name="prompt-tuning", num_virtual_tokens=7)),
]


@pytest.mark.parametrize("method, controls, traits, expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_method_controls_give_the_config_and_round_trip(panel: Any, method: str, controls: dict, traits: dict,
                                                        expected: MethodConfig) -> None:
    from widgets import MethodPanel

    panel.method = method
    for description, value in controls.items():
        control(panel, description).value = value
    for name, value in traits.items():
        setattr(panel, name, value)
    assert panel.to_config() == expected and panel.error == ""

    fresh = MethodPanel(home=panel.home, background=False, model=panel.model)
    fresh.from_config(expected)
    assert fresh.method == method and fresh._method.value == method
    assert fresh.to_config() == expected
    for description, value in controls.items():  # the controls show the restored values
        assert control(fresh, description).value == (pytest.approx(value) if isinstance(value, float) else value)


def test_hidden_knobs_the_core_would_refuse_are_left_neutral(panel: Any) -> None:
    panel.method = "lora"
    panel.target_modules = ["query"]
    panel.use_dora = panel.use_rslora = True
    assert panel.to_config().use_dora
    panel.method = "prompt-tuning"  # no targets and no LoRA variants there
    cfg = panel.to_config()
    assert cfg.target_modules == "auto" and not cfg.use_dora and not cfg.use_rslora
    panel.method = "ia3"
    assert panel.to_config() == MethodConfig(name="ia3", target_modules=["query"])
    panel.method = "lora"  # the lora settings are still there
    assert panel.to_config() == MethodConfig(name="lora", target_modules=["query"], use_dora=True, use_rslora=True)


def test_invalid_adalora_settings_show_inline(panel: Any) -> None:
    panel.method = "adalora"
    control(panel, "Average rank r").value = 16  # above init_r = 12
    with pytest.raises(WorkbenchError, match="init_r"):
        panel.to_config()
    assert "init_r" in panel.error and "init_r" in panel._error_html.value
    panel.init_r = 16
    assert panel.to_config().init_r == 16 and panel.error == "" and panel._error_html.value == ""


@pytest.mark.parametrize("method, knobs", [
    ("lora", {"r": 4, "use_dora": True, "target_modules": ["query", "value"], "train_head": False}),
    ("qlora", {"r": 2}),
    ("adalora", {"r": 4, "init_r": 9, "target_modules": ["key"]}),
    ("ia3", {"train_head": False}),
    ("prompt-tuning", {"num_virtual_tokens": 5}),
    ("full", {}),
    ("head-only", {}),
])
def test_readout_equals_inspect_model(panel: Any, tiny_model_dir: Path, method: str, knobs: dict) -> None:
    panel.method = method
    for name, value in knobs.items():
        setattr(panel, name, value)
    expected = direct_count(tiny_model_dir, panel.home, method=method, **knobs)
    assert expected is not None and panel.estimate["trainable_parameters"] == expected
    if knobs:  # the knobs reached inspect_model: the defaults count something else
        assert direct_count(tiny_model_dir, panel.home, method=method) != expected
    assert f'title="{expected:,}"' in panel._readout.value
    assert panel.refusal == "" and panel._refusal_html.value == ""


def test_ia3_all_linear_reaches_the_estimate(panel: Any, tiny_model_dir: Path) -> None:
    panel.method = "ia3"
    auto = panel.estimate["trainable_parameters"]
    panel.all_linear = True
    assert panel.estimate["trainable_parameters"] == direct_count(
        tiny_model_dir, panel.home, method="ia3", target_modules="all-linear") != auto


def test_prefix_tuning_refused_on_bert_inline(panel: Any, tiny_model_dir: Path) -> None:
    from widgets import MethodPanel

    panel.method = "lora"
    lora_readout = panel._readout.value
    panel._method.value = "prefix-tuning"
    assert panel.estimate["trainable_parameters"] is None
    assert "prefix-tuning does not work on BertForSequenceClassification" in panel.refusal
    assert panel.refusal == panel.estimate["note"]
    assert "prefix-tuning does not work" in panel._refusal_html.value  # next to the selector
    assert panel._refusal_html in panel.children[0].children
    assert "No trainable count" in panel._readout.value and "past_key_values" in panel._readout.value
    assert panel._readout.value != lora_readout
    assert panel.error == ""

    with pytest.raises(WorkbenchError, match="prefix-tuning does not work"):
        panel.to_config()  # like any invalid setting: the error is set and raised ...
    assert panel.error == panel.refusal
    assert panel._error_html.value == ""  # ... but shown once, next to the selector

    panel.method = "prompt-tuning"  # the suggested alternative clears it
    assert panel.refusal == "" and panel._refusal_html.value == ""
    assert panel.to_config() == MethodConfig(name="prompt-tuning")

    # from_config of a refused method: the fields are restored, to_config still refuses
    fresh = MethodPanel(home=panel.home, background=False, model=str(tiny_model_dir))
    fresh.from_config(MethodConfig(name="prefix-tuning", num_virtual_tokens=6, train_head=False))
    assert fresh.method == "prefix-tuning" and fresh.num_virtual_tokens == 6 and not fresh.train_head
    assert control(fresh, "Virtual tokens").value == 6
    assert fresh.refusal
    with pytest.raises(WorkbenchError):
        fresh.to_config()


def test_prefix_tuning_round_trip_where_the_model_takes_it(panel: Any, tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Once peft and transformers agree again the refusal lifts itself; the panel follows the core."""
    from workbench.models import classifier, inspect

    from widgets import MethodPanel

    for module in (classifier, inspect):  # the estimate and the real build both ask
        monkeypatch.setattr(module, "prefix_tuning_refusal", lambda model: None)
    panel.method = "prefix-tuning"
    control(panel, "Virtual tokens").value = 4
    expected = direct_count(tiny_model_dir, panel.home, method="prefix-tuning", num_virtual_tokens=4)
    assert expected and panel.estimate["trainable_parameters"] == expected
    assert panel.refusal == "" and f'title="{expected:,}"' in panel._readout.value
    cfg = panel.to_config()
    assert cfg == MethodConfig(name="prefix-tuning", num_virtual_tokens=4)
    fresh = MethodPanel(home=panel.home, background=False, model=panel.model)
    fresh.from_config(cfg)
    assert fresh.to_config() == cfg


def test_core_methods_without_a_sub_panel_get_the_no_settings_fallback(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench import config as core_config

    from widgets import METHOD_PANELS, MethodPanel, method_panel

    from workbench import methods as registry

    monkeypatch.setattr(core_config, "METHODS", (*METHODS, "zero-shot"))  # added to the core later
    monkeypatch.setitem(registry.METHODS, "zero-shot", registry.MethodSpec(
        "zero-shot", "Zero-shot", "a method added to the registry later", "zero-shot", (), None))
    monkeypatch.setattr(method_panel, "METHOD_PANELS", dict(METHOD_PANELS))
    del method_panel.METHOD_PANELS["head-only"]  # and a core method whose sub-panel went missing
    panel = MethodPanel(home=tmp_path / "home", background=False, model=str(tiny_model_dir))
    assert panel._method.options == (*METHODS, "zero-shot")
    for name in ("zero-shot", "head-only"):
        panel._method.value = name
        body = panel._body.children[0]
        assert isinstance(body, W.HTML) and "no settings" in body.value
        assert panel.estimate is None and panel._readout.value == "" and panel.error == ""
    panel.method = "zero-shot"
    panel.r = 4
    assert panel.to_config() == MethodConfig(name="zero-shot", r=4)


def test_registered_extra_method_is_offered_but_not_configurable(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from widgets import METHOD_PANELS, MethodPanel, method_panel, register_method

    monkeypatch.setattr(method_panel, "METHOD_PANELS", dict(METHOD_PANELS))
    register_method("my-method", lambda panel: W.HTML("mine"))
    panel = MethodPanel(home=tmp_path / "home", background=False, model=str(tiny_model_dir))
    assert panel._method.options[-1] == "my-method"
    panel.method = "my-method"
    assert panel._body.children[0].value == "mine" and panel.estimate is None
    with pytest.raises(WorkbenchError, match="core does not know it"):
        panel.to_config()
    assert "core does not know it" in panel._error_html.value


def test_zero_shot_methods_have_their_own_controls_and_round_trip(panel: Any) -> None:
    """Label text for the embedding baseline; scoring, k examples and calibration for the prompt one. The
    prompt's options go back to neutral for other methods (the core refuses them there)."""
    from widgets import MethodPanel

    panel._method.value = "zero-shot-embedding"
    body = panel._body.children[0]
    assert "Nothing trains" in body.children[0].value and panel.estimate is None
    assert panel.to_config() == MethodConfig(name="zero-shot-embedding")
    body.children[1].children[0].value = "News about {label}."  # the label text box
    assert panel.to_config().label_template == "News about {label}."

    panel._method.value = "zero-shot-prompt"
    scoring, shots = panel._body.children[0].children[1].children
    calibrate = panel._body.children[0].children[2]
    scoring.value, shots.value, calibrate.value = "first", 3, True
    cfg = panel.to_config()
    assert (cfg.prompt_scoring, cfg.few_shot_k, cfg.prompt_calibration) == ("first", 3, True)
    panel.method = "lora"  # the prompt-only options are refused for lora by the core: neutral here
    assert (panel.to_config().few_shot_k, panel.to_config().prompt_calibration) == (0, False)

    fresh = MethodPanel(home=panel.home, background=False, model=panel.model)
    fresh.from_config(cfg)
    assert fresh.to_config() == cfg and fresh.few_shot_k == 3 and fresh.prompt_calibration is True
    panel.label_template = "no placeholder"
    panel.method = "zero-shot-embedding"
    with pytest.raises(WorkbenchError, match="label_template"):
        panel.to_config()
    assert "label_template" in panel._error_html.value


@pytest.mark.parametrize("method", ["full", "head-only", "lora", "qlora", "adalora", "ia3", "prompt-tuning",
                                    "zero-shot-embedding"])
def test_each_method_chosen_in_the_panel_trains_and_the_readout_is_what_trains(panel: Any, tiny_config: Any,
                                                                               tmp_path: Path, method: str) -> None:
    """A user picks the method in the dropdown, the run trains it, and the panel's live trainable-parameter
    count is the run's own (zero-shot: nothing trains, no readout)."""
    import dataclasses

    from workbench import RunStore
    from workbench.loop import train

    panel._method.value = method
    if method in ("lora", "qlora", "adalora"):
        control(panel, "Rank r" if method != "adalora" else "Average rank r").value = 4
    panel.refresh()
    config = dataclasses.replace(tiny_config(train={"epochs": 1, "batch_size": 12, "learning_rate": 5e-3}),
                                 method=panel.to_config())
    record = train(config, store=RunStore(tmp_path / "runs"))
    assert record["status"] == "completed", record["error"]
    assert record["config"]["method"]["name"] == method
    if method == "zero-shot-embedding":
        assert panel.estimate is None and record["info"]["trainable_params"] == 0
    else:
        assert record["info"]["trainable_params"] == panel.estimate["trainable_parameters"] > 0
