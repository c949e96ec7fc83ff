"""A chat run exported for the engines that serve LLMs: a GGUF file for llama.cpp and Ollama, or a directory vLLM
serves. `workbench export RUN --format gguf|vllm` (export.export_run) writes them; this module holds the formats.

- gguf: the run's adapters merged into the base and written as one `model.gguf` with gguf's GGUFWriter, laid out as
  llama.cpp's convert_hf_to_gguf.py lays out a Llama model: the tensor names from gguf's own name map
  (gguf.get_tensor_name_map), the query and key rows re-ordered for llama.cpp's rotary layout, 1-D tensors in F32,
  the others in F16 or F32; a byte-level BPE tokenizer as tokenizer model "gpt2" (tokens, token types, merges,
  special token ids, chat template). Beside it an Ollama `Modelfile`: FROM ./model.gguf, the chat template in
  Ollama's Go-template syntax (derived from the Jinja template by rendering it, and checked against it), a stop
  parameter per end-of-turn token, temperature 0 (the run answers greedily) and the run's answer length.
- vllm: merged (`merge=True`, always for method full): a transformers model directory (safetensors, config,
  generation_config, tokenizer, chat template) served with `vllm serve <dir>`; unmerged: the peft LoRA adapter in
  `adapter/` (adapter_config.json, adapter_model.safetensors) for vLLM's multi-LoRA serving on the base model
  (`vllm serve <base> --enable-lora --lora-modules <name>=<dir>/adapter --max-lora-rank <r>`). SERVE.md names the
  exact command. vLLM refuses DoRA adapters, adapters with modules_to_save and ranks above --max-lora-rank; the
  first two are refused here, the rank is put in the command.

Every format reloads with transformers (a GGUF through `from_pretrained(dir, gguf_file="model.gguf")`), and
the tests hold that it answers what the run's own model answers, greedily.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import Config
from ..errors import WorkbenchError
from ..methods import float_twin, method_spec

EngineFormat = Literal["gguf", "vllm"]
ENGINE_FORMATS: tuple[str, ...] = ("gguf", "vllm")
GgufPrecision = Literal["f16", "f32"]
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
SERVE_FILE = "SERVE.md"
ADAPTER_DIR = "adapter"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
# transformers class -> gguf architecture (one entry per architecture written; llama.cpp's LlamaModel layout)
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "LLAMA"}
_PROBE = ("\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01NEXT\x01")  # contents no template holds


@dataclass(frozen=True)
class TurnFormat:
    """A chat template that wraps each turn as prefix + content + suffix per role, with a cue before the answer."""

    prefix: dict[str, str]  # role -> text before the content
    suffix: dict[str, str]  # role -> text after the content
    generation_prompt: str  # the assistant's cue after the last turn
    default_system: str | None  # the system text the template puts first when a conversation has none


def engine_exportable(config: Config) -> bool:
    """Whether the run's task is the one these formats hold: chat (a causal LM that answers in turns)."""
    from ..tasks.chat import SPEC

    return config.task == SPEC.name


def check_engine_export(config: Config, run: str, fmt: str) -> None:
    """Refuse what an engine export cannot hold: an unknown format or a run that is no chat run."""
    if fmt not in ENGINE_FORMATS:
        raise WorkbenchError(f"--format {fmt!r} is not an engine format: choose hf, {' or '.join(ENGINE_FORMATS)}")
    if not engine_exportable(config):
        raise WorkbenchError(f"run {run} is a task: {config.task} run; --format {fmt} exports chat runs only (a "
                             "causal LM that answers in turns): export this run with --format hf")


def export_for_engine(record: dict[str, Any], home: Path, out: Path, fmt: EngineFormat, merge: bool,
                      precision: GgufPrecision = "f32", final: Path | None = None) -> dict[str, Any]:
    """Write the chat run `record` into the empty directory `out` in format `fmt`; return what the export
    holds (for workbench_export.json): files, how to load and serve it. `final`: where `out` will be renamed to
    (the paths the serve commands name; default `out`)."""
    final = final or out
    config = Config.from_dict(record["config"])
    check_engine_export(config, record["id"], fmt)
    if precision not in ("f16", "f32"):
        raise WorkbenchError(f"--precision {precision!r} is not a GGUF precision written here: choose f32 or f16")
    method = config.method.name
    standalone = fmt == "gguf" or merge or not method_spec(method).uses_adapters
    if fmt == "vllm" and not standalone and config.method.use_dora:
        raise WorkbenchError(f"run {record['id']} trained DoRA adapters, which vLLM does not load: export with "
                             "--merge (vLLM serves the merged model)")
    model, tokenizer, base = _chat_model(record, home, config, merged=standalone)
    if not getattr(tokenizer, "chat_template", None):
        from ..tasks.chat import ChatEncoder

        tokenizer.chat_template = ChatEncoder(tokenizer, config.train.max_length).template  # as the run rendered
    info: dict[str, Any] = {"run_id": record["id"], "task": config.task, "format": fmt, "method": method,
                            "merged": standalone, "base_model": base, "system_prompt": config.chat.system_prompt}
    if fmt == "gguf":
        write_gguf(model, tokenizer, out / GGUF_FILE, precision, name=f"workbench-{record['id']}",
                   pre=_source_pre_tokenizer(config, home))
        stops = write_modelfile(tokenizer, out / MODELFILE, config.chat.system_prompt, config.chat.max_new_tokens)
        info.update(files=[GGUF_FILE, MODELFILE], precision=precision, stop=stops,
                    load=f"AutoModelForCausalLM.from_pretrained(<this directory>, gguf_file={GGUF_FILE!r}); "
                         f"AutoTokenizer.from_pretrained(<this directory>, gguf_file={GGUF_FILE!r})",
                    serve=f"ollama create {_served_name(record)} -f {final / MODELFILE}; "
                          f"or llama-server -m {final / GGUF_FILE} --jinja")
    else:
        info.update(_write_vllm(model, tokenizer, out, final, record, config, base, standalone))
    if method_spec(method).quantized:
        info["note"] = ("merged into a float32 base" if standalone else "the adapter applies to the float base")
        info["note"] += ("; the run trained against 4-bit weights, so answers can differ from the run's by the "
                         "quantisation error")
    return info


# --- the model ---------------------------------------------------------------------------------------

def _chat_model(record: dict[str, Any], home: Path, config: Config, merged: bool) -> tuple[Any, Any, str]:
    """(the run's model, merged into a float32 base when `merged`, else the peft model; its tokenizer; the base
    model's path or hub id)."""
    from ..catalog import resolve_model
    from ..models.adapters import merge_adapters
    from ..tasks.chat import build_chat_model
    from ..tasks.generation import rebuild_generation_run

    method = config.method.name
    if merged and float_twin(method) != method:  # a 4-bit base cannot hold merged weights
        raw = dict(record["config"], method=dict(record["config"]["method"], name=float_twin(method)))
        record = dict(record, config=raw)
    _, built = rebuild_generation_run(record, home, build_chat_model)
    model = merge_adapters(built.model) if merged else built.model
    base = resolve_model(config.model, home, config.trust_remote_code).path
    return model.eval(), built.tokenizer, base


# --- GGUF ----------------------------------------------------------------------------------------------

def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, precision: GgufPrecision = "f32",
               name: str = "", pre: str | None = None) -> Path:
    """Write a merged causal LM and its byte-level BPE tokenizer as one GGUF file (llama.cpp's Llama layout)."""
    import gguf

    arch = _gguf_architecture(model.config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        _write_hyperparameters(writer, model.config, precision, name)
        _write_tokenizer(writer, tokenizer, model.config.vocab_size, pre)
        _write_tensors(writer, model, arch, precision)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _gguf_architecture(config: Any) -> Any:
    """The gguf MODEL_ARCH of a transformers config, or a WorkbenchError naming what is supported and the fix."""
    import gguf

    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if arch not in GGUF_ARCHITECTURES:
        raise WorkbenchError(f"--format gguf writes {', '.join(GGUF_ARCHITECTURES)} models; this run's model is "
                             f"{arch}: export it with --format vllm or hf and convert that directory with llama.cpp's "
                             "convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    problems = [what for what, bad in (
        (f"rope type {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
        ("attention biases", getattr(config, "attention_bias", False)),
        ("MLP biases", getattr(config, "mlp_bias", False)),
        ("a head size other than hidden_size / heads",
         getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads)))
        if bad]
    if problems:
        raise WorkbenchError(f"--format gguf writes plain Llama models; this one has {', '.join(problems)}: export "
                             "it with --format vllm or hf and convert that directory with llama.cpp's "
                             "convert_hf_to_gguf.py")
    return getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[arch])


def _write_hyperparameters(writer: Any, config: Any, precision: GgufPrecision, name: str) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads = config.num_attention_heads
    writer.add_name(name or "workbench chat model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if precision == "f16" else gguf.LlamaFileType.ALL_F32)


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Query/key rows from transformers' rotate-half order to llama.cpp's interleaved pairs (convert_hf_to_gguf's
    LlamaModel.permute; transformers' GGUF loader undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _write_tensors(writer: Any, model: torch.nn.Module, arch: Any, precision: GgufPrecision) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the embedding matrix when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise WorkbenchError(f"--format gguf has no GGUF name for tensor {hf_name!r} of this model: export it "
                                 "with --format vllm or hf and convert that directory with llama.cpp")
        data = tensor.detach().float()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_rotary(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_rotary(data, kv_heads)
        keep_f32 = precision == "f32" or data.dim() == 1  # llama.cpp keeps norms in F32
        writer.add_tensor(gguf_name, data.numpy() if keep_f32 else data.half().numpy())


def _byte_level_bpe(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return (spec.get("model") or {}).get("type") == "BPE" and '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer"))


def _source_pre_tokenizer(config: Config, home: Path) -> str | None:
    """The pre-tokenizer name llama.cpp gave the model's packaged GGUF (smollm2: "smollm"), if it came from one."""
    from ..catalog import MODELS

    asset = MODELS.get(config.model)
    if asset is None or not asset.relpath.endswith(".gguf") or not asset.installed:
        return None
    import gguf

    field = gguf.GGUFReader(asset.path()).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> None:
    """tokenizer.ggml.*: as convert_hf_to_gguf's _set_vocab_gpt2 (tokens, types, merges, special ids, template)."""
    import gguf

    if not _byte_level_bpe(tokenizer):
        raise WorkbenchError("--format gguf writes byte-level BPE tokenizers (GPT-2 style, as smollm2's); this "
                             f"model's tokenizer is a {type(tokenizer).__name__} of another kind: export with "
                             "--format vllm or hf and convert that directory with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise WorkbenchError(f"the tokenizer has ids up to {max(vocab.values())} but the model only "
                             f"{vocab_size} embeddings: resize the model's embeddings to the tokenizer and train again")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as saved:  # gguf's SpecialVocab reads a saved tokenizer
        tokenizer.save_pretrained(saved)
        gguf.SpecialVocab(saved, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    end_of_turn = _end_of_turn_ids(tokenizer)
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])


# --- the Ollama Modelfile -------------------------------------------------------------------------------

def turn_format(tokenizer: Any) -> TurnFormat:
    """The tokenizer's chat template as per-role prefixes and suffixes, found by rendering probe conversations and
    checked on a longer one; a template of another shape is refused."""
    system, user, assistant, following = _PROBE

    def render(messages: list[dict[str, str]], cue: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=cue)

    turns = [{"role": "system", "content": system}, {"role": "user", "content": user},
             {"role": "assistant", "content": assistant}]
    prefix, suffix, before = {}, {}, ""
    for n, turn in enumerate(turns, start=1):
        text = render(turns[:n])
        if not text.startswith(before) or text[len(before):].count(turn["content"]) != 1:
            raise _template_error("a turn changes what came before it")
        prefix[turn["role"]], suffix[turn["role"]] = text[len(before):].split(turn["content"])
        before = text
    cue = render(turns[:2], cue=True)[len(render(turns[:2])):]
    alone = render([turns[1]])
    default_system = None
    if alone != prefix["user"] + user + suffix["user"]:
        head = alone[: len(alone) - len(prefix["user"] + user + suffix["user"])]
        if not (head.startswith(prefix["system"]) and head.endswith(suffix["system"])):
            raise _template_error("a conversation without a system turn gets text that is no system turn")
        default_system = head[len(prefix["system"]): len(head) - len(suffix["system"])]
    form = TurnFormat(prefix, suffix, cue, default_system)
    longer = turns + [{"role": "user", "content": following}]
    if render(longer, cue=True) != _render(form, longer) + cue:
        raise _template_error("a four-turn conversation renders differently")
    return form


def _render(form: TurnFormat, messages: list[dict[str, str]]) -> str:
    return "".join(form.prefix[m["role"]] + m["content"] + form.suffix[m["role"]] for m in messages)


def _template_error(why: str) -> WorkbenchError:
    return WorkbenchError(f"the model's chat template is not one turn after another ({why}), so no Ollama template "
                          "can be derived from it: export with --format vllm, or write the Modelfile TEMPLATE by hand")


def ollama_template(form: TurnFormat) -> str:
    """The turn format in Ollama's Go-template syntax over .Messages, with the cue after a last non-assistant turn."""
    pieces = [f"{{{{ range $i, $_ := .Messages }}}}"]
    for n, role in enumerate(("system", "user", "assistant")):
        pieces.append(f"{{{{ {'if' if n == 0 else 'else if'} eq .Role \"{role}\" }}}}"
                      f"{form.prefix[role]}{{{{ .Content }}}}{form.suffix[role]}")
    pieces.append("{{ end }}")
    pieces.append(f"{{{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role \"assistant\") }}}}"
                  f"{form.generation_prompt}{{{{ end }}}}")
    pieces.append("{{ end }}")
    text = "".join(pieces)
    literal = "".join(list(form.prefix.values()) + list(form.suffix.values()) + [form.generation_prompt])
    if "{{" in literal or '"""' in literal:
        raise _template_error('its text holds "{{" or \'"""\'')
    return text


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the eos token and the special token that closes an assistant turn."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        closing = turn_format(tokenizer).suffix["assistant"].strip()
    except WorkbenchError:
        closing = ""
    if closing and tokenizer.convert_tokens_to_ids(closing) not in (None, tokenizer.unk_token_id):
        ids.append(tokenizer.convert_tokens_to_ids(closing))
    return list(dict.fromkeys(ids))


def write_modelfile(tokenizer: Any, path: Path, system_prompt: str | None, max_new_tokens: int) -> list[str]:
    """Write an Ollama Modelfile for ./model.gguf; return its stop strings."""
    form = turn_format(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in _end_of_turn_ids(tokenizer)]
    lines = [f"FROM ./{GGUF_FILE}", f'TEMPLATE """{ollama_template(form)}"""']
    system = system_prompt if system_prompt is not None else form.default_system
    if system is not None:  # Ollama puts it first when a conversation has no system turn, as the template did
        if '"""' in system:
            raise WorkbenchError('the system prompt holds \'"""\', which a Modelfile cannot quote: remove it')
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_predict {max_new_tokens}"]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return stops


# --- vLLM ---------------------------------------------------------------------------------------------------

def _served_name(record: dict[str, Any]) -> str:
    return f"workbench-{record['id']}"


def _write_vllm(model: Any, tokenizer: Any, out: Path, final: Path, record: dict[str, Any], config: Config,
                base: str, merged: bool) -> dict[str, Any]:
    """The merged model directory, or the adapter folder for multi-LoRA serving; SERVE.md with the command."""
    name = _served_name(record)
    if merged:
        model.save_pretrained(out, safe_serialization=True)  # config, generation_config, model.safetensors
        tokenizer.save_pretrained(out)  # tokenizer files and chat_template.jinja
        command = f"vllm serve {final} --served-model-name {name}"
        load = "AutoModelForCausalLM.from_pretrained(<this directory>)"
    else:
        adapter = out / ADAPTER_DIR
        model.save_pretrained(adapter, safe_serialization=True)  # adapter_config.json, adapter_model.safetensors
        (adapter / "README.md").unlink(missing_ok=True)  # peft's empty card; the export's README.md describes it
        saved = json.loads((adapter / "adapter_config.json").read_text())
        if saved.get("modules_to_save"):
            raise WorkbenchError("the adapter saves whole modules (modules_to_save), which vLLM does not load: "
                                 "export with --merge")
        rank = next((r for r in VLLM_LORA_RANKS if r >= saved["r"]), saved["r"])
        command = f"vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules {name}={final / ADAPTER_DIR}"
        load = (f"base = AutoModelForCausalLM.from_pretrained({base!r}); "
                f"PeftModel.from_pretrained(base, <this directory>/{ADAPTER_DIR})")
    request = (f"curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d "
               f"'{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
               f"\"temperature\": 0, \"max_tokens\": {config.chat.max_new_tokens}}}'")
    system = (f"\nThe run was trained with the system prompt {config.chat.system_prompt!r}: send it as the first "
              "message (role system) to be answered as the run answers.\n" if config.chat.system_prompt else "")
    text = (f"# Serving run {record['id']} with vLLM\n\n"
            + ("The merged model (the LoRA weights added into the base):\n\n" if merged else
               f"The base model plus the run's LoRA adapter ({ADAPTER_DIR}/), served by name {name}:\n\n")
            + f"```\n{command}\n```\n\nAsk it greedily, as the run answers:\n\n```\n{request}\n```\n{system}")
    tmp = out / f".{SERVE_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / SERVE_FILE)
    return {"files": sorted(p.name for p in out.iterdir()), "serve": command, "load": load, "served_name": name}
