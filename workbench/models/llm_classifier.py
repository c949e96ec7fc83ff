"""A causal LM as a text classifier: the label tokens are scored, nothing is generated.

`task: text-classification` with a causal-LM checkpoint (LlamaForCausalLM, GPT2LMHeadModel, ...) builds an
`LLMClassifier` instead of a sequence-classification head. Each text is put in the prompt that zero-shot
prompting uses (`prompting.PromptBuilder`: the chat template or the plain "Answer:" prompt, the same
instruction, the same label verbalisations), and a label's logit is its score after that prompt per
`method.prompt_scoring` (default "sum": log p of the label's tokens). Training minimises the cross-entropy
over those label scores; before the first step the classifier predicts exactly what the zero-shot-prompt
run of the same model does, so that run is step 0 of this method.

Memory stays flat at evaluation and in training: the scoring (`prompting.label_scores`, shared with
zero-shot prompting) applies the LM head to the last prompt position only, and a multi-token label runs
its own few tokens on the prompts' key/value cache. No (batch x sequence x vocabulary) tensor is made;
with 49k vocabulary entries that tensor is what runs other tools out of memory at evaluation.

Prompts are left-padded (positions follow the attention mask). The text, not the prompt, is cut to
train.max_length tokens: the instruction and the answer cue always survive.

Methods: full (every weight), lora, qlora (4-bit base, LM head unquantised), adalora, ia3 and
prompt-tuning (virtual tokens before every prompt). head-only is refused (the LM head is the output
embedding, usually tied to the input one: there is no separate head), and so is prefix-tuning (peft hands
the prefix in as a key/value cache, which the label scoring uses for itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..catalog import ModelSource
from ..config import Config
from ..errors import WorkbenchError
from ..methods import method_spec
from .adapters import adapter_targets, apply_method, bnb_config
from .built import BuiltModel
from .loading import architecture, count_parameters, load_pretrained
from .prompting import PromptBuilder, check_label_tokens, label_scores

def refusal(method: str, arch: str) -> str | None:
    """Why `method` cannot train a causal-LM classifier, or None when it can."""
    spec = method_spec(method)
    if spec.family == "head":
        return (f"method {method} cannot train a causal LM ({arch}) as a classifier: it scores label tokens "
                "with its LM head, which is the output embedding (usually tied to the input one), so there is "
                "no separate head to train. Use lora (the usual choice), ia3, prompt-tuning or full")
    if spec.peft_type == "PREFIX_TUNING":
        return (f"method {method} is not supported for a causal LM ({arch}) as a classifier: peft passes "
                "the prefix as a key/value cache, which the label scoring needs for the label tokens. "
                "Use prompt-tuning (trained virtual tokens, the closest method) or lora")
    return None


def output_head_names(model: nn.Module) -> list[str]:
    """Module names of the LM head (the output embedding): never an adapter target, never quantised."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if head is not None and module is head]


class LLMClassifier(nn.Module):
    """A causal LM whose logits over the labels are the label-token scores after the classification prompt.

    forward(input_ids, attention_mask, labels=None) takes left-padded prompts (`PromptBuilder.encode`) and
    returns `.logits` (batch, num_labels) and, with labels, `.loss` (cross-entropy over the label scores).
    `lm` is the causal LM, peft-wrapped for peft methods.
    """

    def __init__(self, lm: nn.Module, label_ids: list[list[int]], scoring: str = "sum") -> None:
        super().__init__()
        self.lm = lm
        self.label_ids = [list(c) for c in label_ids]
        self.scoring = scoring

    @property
    def workbench_peft_model(self) -> nn.Module:
        """The peft-wrapped model inside (adapters.peft_model_of reads it)."""
        return self.lm

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model itself; peft's adapters (lora, ia3, adalora) sit inside it."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def _virtual_tokens(self, rows: int) -> torch.Tensor | None:
        config = getattr(self.lm, "active_peft_config", None)
        if config is None or not config.is_prompt_learning:
            return None
        return self.lm.get_prompt(batch_size=rows)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = label_scores(self.causal_lm, input_ids, attention_mask, self.label_ids, self.scoring,
                              prefix_embeds=self._virtual_tokens(input_ids.shape[0]))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
            loss = loss + _adalora_penalty(self.lm)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _adalora_penalty(lm: nn.Module) -> torch.Tensor | float:
    """AdaLoRA's orthogonality regulariser, which peft adds only to a loss the model computes itself.

    The same formula as peft 0.21's AdaLoraModel.forward: mean over lora_A / lora_B of ||P P^T - I||_F,
    times orth_reg_weight. 0 for every other method.
    """
    tuner = getattr(lm, "base_model", None)
    if type(tuner).__name__ != "AdaLoraModel":
        return 0.0
    adapter = tuner.trainable_adapter_name
    weight = tuner.peft_config[adapter].orth_reg_weight
    terms = []
    for name, p in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
    return weight * torch.stack(terms).mean() if terms else 0.0


def build_llm_classifier(config: Config, source: ModelSource, labels: list[str], model_config: Any,
                         tokenizer: Any, limit: int | None, total_steps: int | None = None) -> Any:
    """Load the causal LM, apply the method, wrap it as an LLMClassifier; returns a BuiltModel."""
    from transformers import AutoModelForCausalLM

    method = config.method
    why = refusal(method.name, architecture(model_config))
    if why:
        raise WorkbenchError(why)
    builder = PromptBuilder(tokenizer, list(labels), config.train.max_length, [])
    label_ids = builder.label_ids()
    check_label_tokens(list(labels), label_ids, method.prompt_scoring)

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if method.spec.quantized:
        kwargs["quantization_config"] = bnb_config(method, _output_head_on_meta(model_config))
    lm = load_pretrained(AutoModelForCausalLM, source, config.trust_remote_code, **kwargs)
    lm.config.id2label, lm.config.label2id = dict(enumerate(labels)), {y: i for i, y in enumerate(labels)}
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"  # the scoring reads each prompt's last position

    excluded = output_head_names(lm)
    built = BuiltModel(model=lm, tokenizer=tokenizer, head_modules=[], max_length_limit=limit, method=method.name,
                       prompt=builder)
    lm, built.target_modules = apply_method(lm, method, [], total_steps, task_type="CAUSAL_LM", excluded=excluded)
    built.model = LLMClassifier(lm, label_ids, method.prompt_scoring)
    built.trainable_params, built.total_params = count_parameters(built.model)
    return built


def _output_head_on_meta(model_config: Any) -> list[str]:
    """The LM head's module names, found on an empty (meta) model, to keep out of 4-bit quantisation."""
    with torch.device("meta"):
        return output_head_names(causal_skeleton(model_config))


def causal_skeleton(model_config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM with no weights (call under torch.device('meta'))."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def check_llm_fits(config: Config, model_config: Any) -> None:
    """Preflight for a causal-LM classifier, without weights: the method, and the adapter targets."""
    method = config.method
    why = refusal(method.name, architecture(model_config))
    if why:
        raise WorkbenchError(why)
    if method.uses_adapters:
        with torch.device("meta"):
            skeleton = causal_skeleton(model_config, config.trust_remote_code)
        excluded = output_head_names(skeleton)
        adapter_targets(skeleton, method, excluded)


def export_info(builder: PromptBuilder, classifier: LLMClassifier) -> dict[str, Any]:
    """What a user needs to classify with an exported causal LM: the prompt, the label tokens, the scoring."""
    example = builder.prompt("{text}")
    return {
        "kind": "causal LM scored on label tokens",
        "prompt_format": "chat template" if builder.chat else "plain",
        "prompt_example": example,
        "label_token_ids": dict(zip(builder.labels, classifier.label_ids)),
        "scoring": classifier.scoring,
        "text_max_tokens": builder.max_length,
        "how": ("build the prompt (the text cut to text_max_tokens tokens), left-pad, and score each label's "
                "tokens after it: workbench.models.prompting.score_labels(model, prompts, label_token_ids, scoring)"),
    }
