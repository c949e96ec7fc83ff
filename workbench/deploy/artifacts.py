"""`workbench optimize RUN`: faster CPU artifacts of a classification or named-entity run, measured against fp32.

Artifacts go to `<run dir>/deploy/<name>/`, each with `artifact.json`; the report to
`<run dir>/deploy/report.json` and `report.md`. Every artifact and the fp32 reference (the run's model with
its adapters merged) are measured on the run's evaluation split in one session, interleaved round by round
(a machine shared with other work slows all of them alike): size on disk, latency p50/p95 at batch 1 and
batch 32, samples/s at batch 32, accuracy, and agreement (share of predictions equal to fp32's).

- int8: dynamic quantisation of every Linear layer, two ways: torch (`quantize_dynamic`, qint8 weights,
  activations quantised on the fly) and ONNX Runtime (the exported graph with attention, LayerNorm and GELU
  fused by onnxruntime's transformer optimizer, then `quantize_dynamic` with per-channel int8 weights). Both
  are measured; `int8` is the faster at batch 32 of those that agree with fp32 on at least 99 % of the
  evaluation texts and lose at most 1 accuracy point (the faster of all when none does); the other stays in
  the report under `candidates`. Measured on bbc-news MiniLM (2 AVX2 cores, 200 texts): fusing took ORT int8
  from 1.2x to 1.6-1.8x fp32, and per-channel weights from 98 % to 99.5 % agreement (per-tensor weights and
  the 7-bit `reduce_range` both agreed less).
- prune: structured pruning that removes work, not zeroed weights that cost the same with dense kernels:
  the least important attention heads (weight norm of the head's value and output projections) and
  feed-forward neurons (mean |activation| on up to 64 training texts times the norm of the neuron's output
  weights) are cut out of the Linear layers of every BERT-style layer, shrinking the matrices.
  Without retraining this costs accuracy; the report says how much.
- onnx: the merged fp32 model exported to ONNX (opset 17, dynamic batch and sequence axes, eager attention so
  that the optimizer can fuse it), fused as above, run with ONNX Runtime.

An artifact slower than fp32 at batch 32 or losing more than 1 accuracy point is marked, with the reasons;
`workbench serve RUN --artifact NAME` warns before serving a marked one.

A tagger run (a task row of kind "tokens": named entities) gets the same artifacts, measured on the held-out
sentences of its own split: its quality is the task's headline metric (seqeval's entity F1, the report's
`metric`, where a classification report has `accuracy`), agreement is the share of words tagged as fp32 tags
them, throughput is in sentences/s, and an artifact losing more than 1 F1 point is marked. The int8-torch and
pruned copies answer through `EntityPredictor.with_model`, the ONNX ones through an EntityPredictor whose
`logits` runs the ONNX Runtime session (`onnx_tagger`); the pruning plan reads training sentences.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from ..run_paths import RunPaths
from ..store import RunStore, private_dir, private_files

ARTIFACTS = ("int8", "prune", "onnx")
NAMES = {"int8": "int8", "prune": "pruned", "onnx": "onnx"}
MAX_ACCURACY_LOSS = 0.01
MIN_AGREEMENT = 0.99  # share of predictions equal to fp32's that the kept int8 should reach
Progress = Callable[[str, float], None]


def _noop(stage: str, fraction: float) -> None:
    pass


# --- predictors over optimised models -----------------------------------------------------------------------

class TorchPredictor:
    """`predict(texts, batch_size)` of a plain (merged, pruned or int8) sequence classifier."""

    def __init__(self, model: Any, tokenizer: Any, labels: list[str], max_length: int,
                 truncation: str = "head") -> None:
        self.model, self.tokenizer, self.labels, self.max_length = model.eval(), tokenizer, labels, max_length
        self.truncation = truncation  # train.truncation: long texts read as the run was trained and evaluated

    def batch(self, encodings: list[dict[str, Any]], tensors: str) -> Any:
        """`encodings` (tokenize_texts) padded into one batch of `tensors` ("pt", "np")."""
        from ..models.built import TEXT_INDEX

        return self.tokenizer.pad([{k: v for k, v in e.items() if k != TEXT_INDEX} for e in encodings],
                                  return_tensors=tensors)

    def probabilities(self, texts: list[str]) -> Any:
        """(texts, classes) probabilities of texts read as the run reads them (head, head+tail, or chunks: a
        text read as chunks gets the mean of its chunks' probabilities)."""
        import numpy as np

        from ..models.built import CHUNK_BATCH, pool_chunks, text_indices, tokenize_texts

        encodings = tokenize_texts(self.tokenizer, texts, self.max_length, self.truncation)
        step = CHUNK_BATCH if len(encodings) > len(texts) else max(1, len(encodings))  # chunks can be many
        rows = [self.row_probabilities(encodings[i: i + step]) for i in range(0, len(encodings), step)]
        return pool_chunks(np.concatenate(rows) if rows else np.zeros((0, len(self.labels))),
                           text_indices(encodings), len(texts))

    def row_probabilities(self, encodings: list[dict[str, Any]]) -> Any:
        """The class probabilities of each encoding, one forward pass."""
        import torch

        with torch.inference_mode():
            return torch.softmax(self.model(**self.batch(encodings, "pt")).logits.float(), dim=-1).numpy()

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        return _results(self, [texts] if isinstance(texts, str) else list(texts), batch_size)


class OnnxPredictor(TorchPredictor):
    """The same over an ONNX Runtime session."""

    def __init__(self, path: Path, tokenizer: Any, labels: list[str], max_length: int, threads: int,
                 truncation: str = "head") -> None:
        self.session = onnx_session(path, threads)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer, self.labels, self.max_length, self.model = tokenizer, labels, max_length, None
        self.truncation = truncation

    def row_probabilities(self, encodings: list[dict[str, Any]]) -> Any:
        import numpy as np

        feed = {k: v.astype(np.int64) for k, v in self.batch(encodings, "np").items() if k in self.inputs}
        logits = self.session.run(None, feed)[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


def onnx_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session of the graph at `path` on `threads` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # idle threads sleep instead of spinning between calls: a server's event loop, its tokenizer and its
    # clients share these cores with the model
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_tagger(path: Path, base: Any, threads: int) -> Any:
    """An EntityPredictor like `base` (the run's tagger: its tokenizer, tags, max_length) whose `logits` runs
    the ONNX graph at `path` (the one place the tagger runs its model)."""
    return _onnx_tagger_class()(path, base, threads)


@functools.cache
def _onnx_tagger_class() -> type:
    """Defined on first use: the token-classification module loads torch, which this module does not."""
    import numpy as np
    import torch

    from ..tasks.token_classification import EntityPredictor

    class OnnxTagger(EntityPredictor):
        def __init__(self, path: Path, base: Any, threads: int) -> None:
            self.session = onnx_session(path, threads)
            self.inputs = {i.name for i in self.session.get_inputs()}
            self.model, self.tokenizer, self.tags, self.max_length = None, base.tokenizer, base.tags, base.max_length
            self.run_id, self.task, self.scheme, self.types = base.run_id, base.task, base.scheme, base.types

        def logits(self, batch: dict[str, Any]) -> Any:
            feed = {k: v.numpy().astype(np.int64) for k, v in batch.items() if k in self.inputs}
            return torch.from_numpy(self.session.run(None, feed)[0]).float()

    return OnnxTagger


def _results(p: TorchPredictor, texts: list[str], batch_size: int) -> list[dict[str, Any]]:
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start: start + batch_size]
        for text, probs in zip(chunk, p.probabilities(chunk).tolist()):
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append({"text": text, "label": p.labels[best],
                        "scores": {name: float(s) for name, s in zip(p.labels, probs)}})
    return out


# --- making each artifact ---------------------------------------------------------------------------------

def quantize_torch(model: Any) -> Any:
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated upstream but works (tested here)
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def export_onnx(model: Any, tokenizer: Any, path: Path, max_length: int) -> None:
    import warnings

    import torch

    sample = tokenizer(["a short sample text", "another one"], padding=True, return_tensors="pt",
                       truncation=True, max_length=max_length)
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    # a tagger's logits have a row per sub-token: their sequence axis varies too
    per_token = type(model).__name__.endswith("ForTokenClassification")
    axes["logits"] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}

    class Logits(torch.nn.Module):  # plain tensors in and out, positional in `names` order
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            return self.inner(**dict(zip(names, args))).logits

    # a copy: exporting changed the exported model's own later predictions (measured on bbc-news: 6 of 200
    # eval predictions differed from the untouched model's afterwards)
    inner = copy.deepcopy(model).eval()
    try:  # the eager attention graph is the pattern onnxruntime's optimizer fuses into one Attention op
        inner.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(inner), tuple(sample[n] for n in names), str(path),
                          input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)


def fuse_onnx(src: Path, dst: Path, config: Any) -> dict[str, int]:
    """The graph with attention, LayerNorm and GELU fused (onnxruntime's transformer optimizer, BERT rules,
    which also cover RoBERTa-style encoders); returns how many of each fused op it made. A graph it cannot
    fuse is kept as it is (counts of 0): still correct, only slower."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    quiet = logging.getLogger("onnxruntime.transformers")  # it logs every pattern it tries
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = optimize_model(str(src), model_type="bert", num_heads=int(getattr(config, "num_attention_heads", 0)),
                               hidden_size=int(getattr(config, "hidden_size", 0)))
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(dst))
    finally:
        quiet.setLevel(level)
    return stats


def quantize_onnx(src: Path, dst: Path) -> None:
    """Dynamic int8: per-channel int8 weights (per-tensor ones agreed less with fp32, measured), activations
    quantised on the fly."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # the quantiser warns through the root logger that it wants pre-processing
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # the fused ops are in Microsoft's domain, where ONNX shape inference finds no types: name the default
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def _bert_layers(model: Any) -> list[Any]:
    """The encoder layers with BERT's shape: attention.self.{query,key,value}, attention.output.dense,
    intermediate.dense, output.dense."""
    layers = []
    for module in model.modules():
        att = getattr(module, "attention", None)
        if (att is not None and hasattr(getattr(att, "self", None), "query") and hasattr(module, "intermediate")
                and hasattr(getattr(module, "output", None), "dense")):
            layers.append(module)
    return layers


def _slice_linear(linear: Any, keep: Any, dim: int) -> Any:
    """A new Linear keeping `keep` output rows (dim 0) or input columns (dim 1)."""
    import torch

    weight = linear.weight.data.index_select(dim, keep).clone()
    out_f, in_f = weight.shape
    new = torch.nn.Linear(in_f, out_f, bias=linear.bias is not None)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data if dim == 1 else linear.bias.data.index_select(0, keep))
    return new


def apply_pruning(model: Any, plan: list[dict[str, list[int]]]) -> Any:
    """Cut each layer down to the heads and neurons that `plan` keeps (in place; returns the model)."""
    import torch

    layers = _bert_layers(model)
    if len(layers) != len(plan):
        raise WorkbenchError(f"the pruning plan has {len(plan)} layers, the model {len(layers)}: re-run optimize")
    for layer, keep in zip(layers, plan):
        sa, out = layer.attention.self, layer.attention.output
        size = sa.attention_head_size
        rows = torch.tensor([h * size + i for h in keep["heads"] for i in range(size)], dtype=torch.long)
        for name in ("query", "key", "value"):
            setattr(sa, name, _slice_linear(getattr(sa, name), rows, 0))
        out.dense = _slice_linear(out.dense, rows, 1)
        sa.num_attention_heads = len(keep["heads"])
        sa.all_head_size = len(rows)
        neurons = torch.tensor(keep["neurons"], dtype=torch.long)
        layer.intermediate.dense = _slice_linear(layer.intermediate.dense, neurons, 0)
        layer.output.dense = _slice_linear(layer.output.dense, neurons, 1)
    return model


def pruning_plan(model: Any, tokenizer: Any, texts: list[str], max_length: int, heads_fraction: float,
                 ffn_fraction: float) -> list[dict[str, list[int]]]:
    """Which heads and feed-forward neurons each layer keeps (the most important; at least one head)."""
    import torch

    layers = _bert_layers(model)
    if not layers:
        raise WorkbenchError("structured pruning handles BERT-style encoders (attention.self.query/key/value, "
                             "intermediate.dense, output.dense): this model has none; leave out --prune")
    acts: list[Any] = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        def hook(module: Any, inputs: Any, output: Any, i: int = i) -> None:
            a = output.detach().abs().flatten(0, -2).sum(0)
            acts[i] = a if acts[i] is None else acts[i] + a
        hooks.append(layer.intermediate.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), 16):
                batch = tokenizer(texts[start: start + 16], truncation=True, max_length=max_length, padding=True,
                                  return_tensors="pt")
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    plan = []
    for layer, act in zip(layers, acts):
        sa, out = layer.attention.self, layer.attention.output
        n_heads, size = sa.num_attention_heads, sa.attention_head_size
        v = sa.value.weight.data.view(n_heads, size, -1)
        o = out.dense.weight.data.view(out.dense.weight.shape[0], n_heads, size)
        head_score = v.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)
        n_keep = max(1, n_heads - int(round(n_heads * heads_fraction)))
        heads = sorted(head_score.topk(n_keep).indices.tolist())
        neuron_score = act * layer.output.dense.weight.data.norm(dim=0)
        n_neurons = neuron_score.numel()
        keep_n = max(1, n_neurons - int(round(n_neurons * ffn_fraction)))
        neurons = sorted(neuron_score.topk(keep_n).indices.tolist())
        plan.append({"heads": heads, "neurons": neurons})
    return plan


# --- measuring -------------------------------------------------------------------------------------------------

def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[k]


def class_answers(predictor: Any, texts: list[str]) -> list[int]:
    """A classifier's predicted label index per text."""
    import numpy as np

    return np.asarray(predictor.probabilities(texts)).argmax(axis=-1).tolist()


def accuracy_of(predicted: list[Any], gold: list[Any]) -> float:
    return float(sum(p == g for p, g in zip(predicted, gold)) / max(1, len(gold)))


def measure(predictors: dict[str, Any], texts: list[Any], gold: list[Any], singles: int = 48,
            batch: int = 32, progress: Progress = _noop, answer: Callable[[Any, list[Any]], list[Any]] = class_answers,
            quality: Callable[[list[Any], list[Any]], float] = accuracy_of, metric: str = "accuracy"
            ) -> dict[str, dict[str, Any]]:
    """Quality (`metric`: `quality(predictions, gold)`), predictions (`answer(predictor, chunk)`: one per
    input), latency and throughput of each predictor, interleaved round by round."""
    names = list(predictors)
    preds: dict[str, list[Any]] = {n: [] for n in names}
    b32: dict[str, list[float]] = {n: [] for n in names}
    b1: dict[str, list[float]] = {n: [] for n in names}
    for p in predictors.values():  # warm-up: first calls allocate
        answer(p, texts[:2])
    chunks = [texts[i: i + batch] for i in range(0, len(texts), batch)]
    for c, chunk in enumerate(chunks):
        for n in names:
            start = time.perf_counter()
            got = answer(predictors[n], chunk)
            b32[n].append(time.perf_counter() - start)
            preds[n].extend(got)
        progress("measuring batch 32", (c + 1) / len(chunks))
    for i, text in enumerate(texts[:singles]):
        for n in names:
            start = time.perf_counter()
            answer(predictors[n], [text])
            b1[n].append(time.perf_counter() - start)
        progress("measuring batch 1", (i + 1) / min(singles, len(texts)))
    out = {}
    for n in names:
        full_times = [t for c, t in zip(chunks, b32[n]) if len(c) == batch] or b32[n]
        out[n] = {
            metric: round(quality(preds[n], gold), 4),
            "predictions": preds[n],
            "latency_ms": {"batch_1": {"p50": round(1000 * statistics.median(b1[n]), 2),
                                       "p95": round(1000 * _percentile(b1[n], 0.95), 2)},
                           "batch_32": {"p50": round(1000 * statistics.median(full_times), 2),
                                        "p95": round(1000 * _percentile(full_times, 0.95), 2)}},
            "samples_per_s": round(len(texts) / sum(b32[n]), 1),
            "samples_per_s_batch_1": round(len(b1[n]) / sum(b1[n]), 1),
        }
    return out


# --- the command ----------------------------------------------------------------------------------------------

@dataclass
class Subject:
    """What optimize measures of one run, whatever its task: the fp32 predictor over the merged model (`.model`,
    `.tokenizer`, `.max_length`), the held-out inputs and their truth, and how to answer and score them."""

    fp32: Any
    items: list[Any]  # evaluation texts (classification) or token lists (a tagger's sentences)
    gold: list[Any]  # label indices, or a tag list per sentence
    labels: list[str]  # class labels, or entity types
    metric: str  # the report's quality figure: "accuracy", or the task's headline ("f1" of entities)
    unit: str  # what one input is, in the report: texts, sentences
    calibration: Callable[[], list[str]]  # training texts the pruning plan reads activations on
    torch_predictor: Callable[[Any], Any]  # a predictor like fp32 over another torch model
    onnx_predictor: Callable[[Path, int], Any]  # ... over an ONNX graph, on n threads
    answer: Callable[[Any, list[Any]], list[Any]]  # predictor, inputs -> a prediction per input
    quality: Callable[[list[Any], list[Any]], float]  # predictions, gold -> the metric


def _subject(run: str, home: str | Path | None) -> tuple[dict[str, Any], Subject]:
    from ..predict import load_predictor
    from .runs import task_row

    store = RunStore(home)
    record = store.get(run)
    predictor = load_predictor(record["id"], store.home)
    spec = task_row(predictor)
    if not spec.optimizable:
        raise WorkbenchError(f"run {record['id']} is a {spec.name} run: optimize handles classification "
                             "and named-entity runs (encoders)")
    if spec.kind == "tokens":
        return record, _tagger(record, predictor, store.home)
    return record, _classifier(record, predictor)


def _classifier(record: dict[str, Any], predictor: Any) -> Subject:
    from .runs import eval_split, merge_adapters

    prompt = getattr(getattr(getattr(predictor, "encode", None), "__self__", None), "prompt", None)
    model = merge_adapters(predictor.model)
    if prompt is not None or not type(model).__name__.endswith("ForSequenceClassification"):
        raise WorkbenchError(f"run {record['id']} classifies with a causal LM prompt: optimize handles encoder "
                             "classifiers (BERT-style); serve this run as fp32")
    tokenizer, max_length, cut = predictor.tokenizer, predictor.max_length, truncation_of(predictor)
    texts, gold, labels = eval_split(record)
    return Subject(TorchPredictor(model, tokenizer, labels, max_length, cut), texts, gold, labels, "accuracy",
                   "texts", lambda: _calibration_texts(record, texts),
                   lambda m: TorchPredictor(m, tokenizer, labels, max_length, cut),
                   lambda path, threads: OnnxPredictor(path, tokenizer, labels, max_length, threads, cut),
                   class_answers, accuracy_of)


def _tagger(record: dict[str, Any], predictor: Any, home: Path) -> Subject:
    """A tagger run: the held-out sentences of its own split, entity F1 (seqeval) as its quality."""
    from ..config import Config
    from ..entities import entity_figures
    from ..tasks import task_of
    from .runs import merge_adapters, task_row

    fp32 = predictor.with_model(merge_adapters(predictor.model))
    config = Config.from_dict(record["config"])
    data = task_of(config).load_data(config, home)
    held = data.held
    if not held:
        raise WorkbenchError(f"run {record['id']} holds out no sentences to measure on")
    types = list(data.types)

    def answer(p: Any, sentences: list[list[str]]) -> list[list[str]]:
        return [tags for tags, _ in p.tag_words(sentences, batch_size=max(1, len(sentences)))]

    def f1(predicted: list[list[str]], gold: list[list[str]]) -> float:
        return entity_figures(gold, predicted, types)[0]["f1"]

    return Subject(fp32, [list(s.tokens) for s in held], [list(s.tags) for s in held], types,
                   task_row(predictor).metrics[0], "sentences", lambda: data.train_texts[:64], fp32.with_model,
                   lambda path, threads: onnx_tagger(path, fp32, threads), answer, f1)


def optimize(run: str = "latest", home: str | Path | None = None, int8: bool = True, prune: bool = False,
             onnx: bool = False, prune_heads: float = 0.25, prune_ffn: float = 0.4, max_eval: int | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Make the asked artifacts, measure them against fp32, write the report; returns it (plain values).

    `progress(stage, fraction)` is called as work goes (fraction 0..1 within the stage). The artifacts (the
    run's weights) and the report are owner-only, as everything in a run's folder.
    """
    with private_files():
        return _optimize(run, home, int8, prune, onnx, prune_heads, prune_ffn, max_eval, progress)


def _optimize(run: str, home: str | Path | None, int8: bool, prune: bool, onnx: bool, prune_heads: float,
              prune_ffn: float, max_eval: int | None, progress: Progress | None) -> dict[str, Any]:
    import torch

    progress = progress or _noop
    if not (int8 or prune or onnx):
        raise WorkbenchError("nothing to make: ask for at least one of --int8, --prune, --onnx")
    for name, value in (("prune_heads", prune_heads), ("prune_ffn", prune_ffn)):
        if not 0 <= value < 1:
            raise WorkbenchError(f"{name} must be a fraction from 0 to below 1, got {value}")
    progress("loading the run", 0.0)
    record, subject = _subject(run, home)
    fp32 = subject.fp32
    run_dir = Path(record["dir"])
    items, gold = subject.items, subject.gold
    if max_eval:
        items, gold = items[:max_eval], gold[:max_eval]
    out_root = private_dir(RunPaths(run_dir).deploy)  # 0700: the server's record and log live here too
    threads = torch.get_num_threads()
    predictors: dict[str, Any] = {"fp32": fp32}
    made: dict[str, dict[str, Any]] = {}
    tmp_root = out_root / ".building"
    shutil.rmtree(tmp_root, ignore_errors=True)
    tmp_root.mkdir()
    try:
        fp32_dir = tmp_root / "fp32"
        fp32_dir.mkdir()
        _save_state(fp32.model, fp32_dir / "model.safetensors")
        onnx_fp32 = tmp_root / "onnx" / "model.onnx"
        if onnx or int8:
            progress("exporting to ONNX", 0.0)
            raw = tmp_root / "exported.onnx"
            export_onnx(fp32.model, fp32.tokenizer, raw, fp32.max_length)
            onnx_fp32.parent.mkdir()
            fused = fuse_onnx(raw, onnx_fp32, fp32.model.config)
            raw.unlink()
        if onnx:
            predictors["onnx"] = subject.onnx_predictor(onnx_fp32, threads)
            made["onnx"] = {"kind": "onnx", "dir": onnx_fp32.parent, "fused": fused}
        if int8:
            progress("quantising to int8", 0.0)
            q = quantize_torch(fp32.model)
            d = tmp_root / "int8-torch"
            d.mkdir()
            torch.save(q.state_dict(), d / "model.pt")
            predictors["int8-torch"] = subject.torch_predictor(q)
            made["int8-torch"] = {"kind": "torch-int8", "dir": d}
            d = tmp_root / "int8-onnx"
            d.mkdir()
            quantize_onnx(onnx_fp32, d / "model.onnx")
            predictors["int8-onnx"] = subject.onnx_predictor(d / "model.onnx", threads)
            made["int8-onnx"] = {"kind": "onnx-int8", "dir": d, "fused": fused}
        if prune:
            progress("pruning heads and neurons", 0.0)
            plan = pruning_plan(fp32.model, fp32.tokenizer, subject.calibration(), fp32.max_length, prune_heads,
                                prune_ffn)
            pruned = apply_pruning(copy.deepcopy(fp32.model), plan)
            d = tmp_root / "pruned"
            d.mkdir()
            _save_state(pruned, d / "model.safetensors")
            (d / "pruning.json").write_text(json.dumps({"heads_fraction": prune_heads, "ffn_fraction": prune_ffn,
                                                        "plan": plan}))
            predictors["pruned"] = subject.torch_predictor(pruned)
            made["pruned"] = {"kind": "pruned", "dir": d}
        results = measure(predictors, items, gold, progress=progress, answer=subject.answer,
                          quality=subject.quality, metric=subject.metric)
        report = _report(record, results, made, fp32_dir, subject, len(items), threads)
        _install(out_root, tmp_root, report, made)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    (out_root / "report.json").write_text(json.dumps(report, indent=2))
    (out_root / "report.md").write_text(report_markdown(report))
    progress("done", 1.0)
    return report


def _calibration_texts(record: dict[str, Any], fallback: list[str]) -> list[str]:
    """Up to 64 training texts (never the evaluation texts the report measures on)."""
    from ..config import Config
    from ..data import prepare

    try:
        config = Config.from_dict(record["config"])
        return prepare(config.data, config.train.seed).train_texts[:64]
    except Exception:
        return fallback[:16]


def _save_state(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _flat(predictions: list[Any]) -> list[Any]:
    """A prediction per text, or a tag per word of every sentence (a tagger's)."""
    return [x for p in predictions for x in p] if predictions and isinstance(predictions[0], list) else predictions


def agreement_of(predictions: list[Any], reference: list[Any]) -> float:
    """The share of predictions (a tagger's: of words' tags) equal to the reference's."""
    a, b = _flat(predictions), _flat(reference)
    return sum(x == y for x, y in zip(a, b)) / max(1, len(b))


def _report(record: dict[str, Any], results: dict[str, dict[str, Any]], made: dict[str, dict[str, Any]],
            fp32_dir: Path, subject: Subject, n_eval: int, threads: int) -> dict[str, Any]:
    base, metric = results["fp32"], subject.metric

    def entry(name: str) -> dict[str, Any]:
        r = results[name]
        agreement = agreement_of(r["predictions"], base["predictions"])
        e = {k: v for k, v in r.items() if k != "predictions"}
        e["size_mb"] = _size_mb(made[name]["dir"]) if name in made else _size_mb(fp32_dir)
        if name != "fp32":
            e["kind"] = made[name]["kind"]
            if made[name].get("fused") is not None:
                e["fused_ops"] = made[name]["fused"]
            e["speedup"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
            e["speedup_batch_1"] = round(base["latency_ms"]["batch_1"]["p50"] / r["latency_ms"]["batch_1"]["p50"], 2)
            e["agreement"] = round(agreement, 4)
            e[f"{metric}_delta"] = round(r[metric] - base[metric], 4)
            reasons = []
            if e["speedup"] < 1.0:
                reasons.append(f"slower than fp32 at batch 32 ({e['speedup']:.2f}x)")
            if round(base[metric] - r[metric], 6) > MAX_ACCURACY_LOSS:  # 1.0 point lost is not > 1
                reasons.append(f"loses {100 * (base[metric] - r[metric]):.1f} {metric} points")
            e["marked"], e["reasons"] = bool(reasons), reasons
        return e

    artifacts: dict[str, Any] = {}
    candidates = [n for n in ("int8-torch", "int8-onnx") if n in results]
    if candidates:
        entries = {n: entry(n) for n in candidates}
        faithful = [n for n in candidates if not entries[n]["marked"] and entries[n]["agreement"] >= MIN_AGREEMENT]
        best = max(faithful or candidates, key=lambda n: results[n]["samples_per_s"])
        artifacts["int8"] = entry(best)
        artifacts["int8"]["backend"] = "torch" if best == "int8-torch" else "onnxruntime"
        artifacts["int8"]["candidates"] = entries
    for name in ("pruned", "onnx"):
        if name in results:
            artifacts[name] = entry(name)
    import platform

    return {"run": record["id"], "model": record["config"].get("model"), "eval_size": n_eval,
            "labels": subject.labels, "metric": metric, "unit": subject.unit, "threads": threads, "load_average": list(os.getloadavg()), "machine": platform.processor() or
            platform.machine(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fp32": entry("fp32"), "artifacts": artifacts,
            "paths": {n: str(RunPaths.of(record).deploy / n) for n in artifacts}}


def _install(out_root: Path, tmp_root: Path, report: dict[str, Any], made: dict[str, dict[str, Any]]) -> None:
    """Move each kept artifact into <run>/deploy/<name>/ with its artifact.json (replacing an older one)."""
    for name, entry in report["artifacts"].items():
        source = made["int8-" + entry["backend"].replace("onnxruntime", "onnx")]["dir"] if name == "int8" \
            else made[name]["dir"]
        info = {k: v for k, v in entry.items() if k != "candidates"}
        info["name"] = name
        info["run"] = report["run"]
        (source / "artifact.json").write_text(json.dumps(info, indent=2))
        target = out_root / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(source), str(target))


def report_markdown(report: dict[str, Any]) -> str:
    rows = [("fp32", report["fp32"])] + [(n, a) for n, a in report["artifacts"].items()]
    metric, unit = report.get("metric", "accuracy"), report.get("unit", "texts")
    rate = "samples/s" if unit == "texts" else f"{unit}/s"
    lines = [f"# Optimize report: run {report['run']}", "",
             f"{report['eval_size']} evaluation {unit}, {report['threads']} threads, load average "
             f"{report['load_average'][0]:.2f}, measured {report['measured_at']}.", "",
             f"| artifact | size MB | b1 p50 ms | b1 p95 ms | b32 p50 ms | b32 p95 ms | {rate} | speedup | "
             f"{metric} | agreement | marked |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in rows:
        lat = a["latency_ms"]
        label = name + (f" ({a['backend']})" if "backend" in a else "")
        lines.append(f"| {label} | {a['size_mb']} | {lat['batch_1']['p50']} | {lat['batch_1']['p95']} | "
                     f"{lat['batch_32']['p50']} | {lat['batch_32']['p95']} | {a['samples_per_s']} | "
                     f"{a.get('speedup', 1.0)}x | {a[metric]:.4f} | {a.get('agreement', 1.0):.4f} | "
                     f"{'; '.join(a.get('reasons', [])) or '-'} |")
    int8 = report["artifacts"].get("int8")
    if int8 and int8.get("candidates"):
        lines += ["", "int8 backends measured: " + ", ".join(
            f"{n} {c['samples_per_s']} {rate}" for n, c in int8["candidates"].items())
            + f"; kept {int8['backend']}."]
    return "\n".join(lines) + "\n"


# --- loading an artifact to serve ------------------------------------------------------------------------------

def artifact_record(run_dir: str | Path, name: str) -> dict[str, Any]:
    path = RunPaths(Path(run_dir)).deploy / name / "artifact.json"
    if not path.is_file():
        have = sorted(p.parent.name for p in RunPaths(Path(run_dir)).deploy.glob("*/artifact.json"))
        raise WorkbenchError(f"run has no artifact {name!r} (has: {', '.join(have) or 'none'}): make it with "
                             f"`workbench optimize RUN --{'prune' if name == 'pruned' else name}`")
    return json.loads(path.read_text())


def truncation_of(predictor: Any) -> str:
    """How a run's predictor cuts long texts (its BuiltModel's train.truncation; head when it cannot say)."""
    built = getattr(getattr(predictor, "encode", None), "__self__", None)
    return getattr(built, "truncation", "head")


def apply_artifact(predictor: Any, run_dir: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """A predictor over artifact `name` of the run whose fp32 predictor (adapters merged) is given: a
    TorchPredictor or OnnxPredictor for a classifier, an EntityPredictor answering with the artifact for a
    tagger (what the server's entity route calls)."""
    import torch

    from .runs import task_row

    info = artifact_record(run_dir, name)
    d = RunPaths(Path(run_dir)).deploy / name
    kind = info["kind"]
    tagger = task_row(predictor).kind == "tokens"
    if kind in ("onnx", "onnx-int8"):
        if tagger:
            return onnx_tagger(d / "model.onnx", predictor, torch.get_num_threads()), info
        return OnnxPredictor(d / "model.onnx", predictor.tokenizer, list(predictor.labels), predictor.max_length,
                             torch.get_num_threads(), truncation_of(predictor)), info
    model = _artifact_model(predictor.model, d, kind, name)
    if tagger:
        return predictor.with_model(model), info
    return TorchPredictor(model, predictor.tokenizer, list(predictor.labels), predictor.max_length,
                          truncation_of(predictor)), info


def _artifact_model(model: Any, d: Path, kind: str, name: str) -> Any:
    """The torch model of a torch-int8 or pruned artifact in folder `d`, built on the run's merged `model`."""
    import torch

    if kind == "torch-int8":
        q = quantize_torch(model)  # the structure; the saved int8 weights go into it
        q.load_state_dict(torch.load(d / "model.pt", weights_only=True))
        return q
    if kind == "pruned":
        from safetensors.torch import load_file

        plan = json.loads((d / "pruning.json").read_text())["plan"]
        pruned = apply_pruning(model, plan)
        pruned.load_state_dict(load_file(str(d / "model.safetensors")))
        return pruned
    raise WorkbenchError(f"artifact {name!r} has an unknown kind {kind!r}: re-run workbench optimize")
