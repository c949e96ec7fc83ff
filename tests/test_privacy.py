"""Personal data masked in everything the workbench stores or shows about data (workbench/privacy.py).

What is found and what is left alone, each piece that masks (errors, data, metrics, classical baseline, store,
NER rows, drift snapshot, log handlers), and end to end: e-mail addresses and phone numbers seeded into a
training file never appear in the run folder, the run store or the server's log after training, predicting
and serving requests that contain them."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import sentiment_rows
from workbench.errors import WorkbenchError
from workbench.privacy import (MaskingFilter, count_personal, find_personal, mask_logging, mask_text, mask_tokens,
                               mask_value, names_from_predictor, stored_text)

# --- what is found ------------------------------------------------------------------------------------------

FOUND = [
    ("write to ann.lee@example.org today", "ann.lee@example.org", "email"),
    ("j_smith+news@mail.example.co.uk wrote", "j_smith+news@mail.example.co.uk", "email"),
    ("call (415) 555-0100 now", "(415) 555-0100", "phone"),
    ("call 415-555-0100 now", "415-555-0100", "phone"),
    ("call 415.555.0100 now", "415.555.0100", "phone"),
    ("call 4155550100 now", "4155550100", "phone"),
    ("call +1 415 555 0100 now", "+1 415 555 0100", "phone"),
    ("call +14155550100 now", "+14155550100", "phone"),
    ("in London +44 20 7946 0958 or", "+44 20 7946 0958", "phone"),
    ("in Berlin +49 30 12345678 or", "+49 30 12345678", "phone"),
    ("in Paris +33 1 42 68 53 00 or", "+33 1 42 68 53 00", "phone"),
    ("in Delhi +91 98765 43210 or", "+91 98765 43210", "phone"),
    ("card 4111 1111 1111 1111 expired", "4111 1111 1111 1111", "card"),
    ("card 4111-1111-1111-1111 expired", "4111-1111-1111-1111", "card"),
    ("card 5500005555555559 expired", "5500005555555559", "card"),
    ("from 192.168.1.20 at night", "192.168.1.20", "ip"),
    ("from 8.8.8.8 at night", "8.8.8.8", "ip"),
    ("from 2001:db8::1 at night", "2001:db8::1", "ip"),
    ("from fe80::1ff:fe23:4567:890a at night", "fe80::1ff:fe23:4567:890a", "ip"),
]

KEPT = ["released in 1999", "I give it 3.5/10", "rated 7/10 and 8.5 out of 10", "costs $12.99 or $1,500,000",
        "2,000,000 rows over the limit", "on 2024-01-15 at 10:30:45", "15/01/2024", "12.03.2024", "in 1995-1996",
        "the 1990s", "version 1.2.3.4 released", "won 6-1 3-1 0-30", "7-6 (7-5) 4-6 6-3 4-6 6-0", "a 9/11 movie",
        "got 1234567 votes", "population 12345678", "GDP 2.5% in 2004-05", "listen on 127.0.0.1:8000 or ::1",
        "step 12000/24000", "2005/06 season", "lr 5.00e-04 1234.5 samples/s", "at 1733243491 seconds",
        "card 4111 1111 1111 1112 fails Luhn", "run 20261203-164132-141c", "ISBN 978-3-16-148410-0",
        "between 1,000 and 2,000", "accuracy 0.8125 f1_macro 0.8050"]


@pytest.mark.parametrize("text,item,kind", FOUND)
def test_each_kind_is_found_and_masked(text, item, kind):
    spans = find_personal(text)
    assert [(text[s:e], k) for s, e, k in spans] == [(item, kind)]
    masked = mask_text(text)
    assert item not in masked and f"[{'IP' if kind == 'ip' else kind.upper()}]" in masked


@pytest.mark.parametrize("text", KEPT)
def test_years_ratings_prices_counts_dates_and_scores_are_kept(text):
    assert mask_text(text) == text


def test_values_are_walked_and_mode_off_keeps_the_text():
    value = {"a@b.org": ["call 415-555-0100", 3, None, {"x": "ok"}], "n": 1.5}
    assert mask_value(value) == {"[EMAIL]": ["call [PHONE]", 3, None, {"x": "ok"}], "n": 1.5}
    assert stored_text("mail a@b.org", "off") == "mail a@b.org"
    assert stored_text("mail a@b.org", "stored") == stored_text("mail a@b.org", "all") == "mail [EMAIL]"
    texts, counts = count_personal(["a@b.org and c@d.org", "plain", "415-555-0100"])
    assert texts == ["[EMAIL] and [EMAIL]", "plain", "[PHONE]"] and counts == {"email": 2, "phone": 1}


def test_names_come_from_a_recogniser_when_one_is_given():
    class Tagger:  # what load_predictor gives for a token-classification run
        def predict(self, texts):
            return [{"text": texts[0], "entities": [{"type": "PER", "start": 0, "end": 9},
                                                   {"type": "LOC", "start": 19, "end": 24}]}]

    text = "Ann Smith lives in Paris"
    assert mask_text(text) == text  # no recogniser: names are kept
    assert mask_text(text, names=names_from_predictor(Tagger())) == "[NAME] lives in Paris"


def test_names_from_a_real_entity_predictor_are_masked(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from workbench.tasks.token_classification import EntityPredictor

    class Tagging(EntityPredictor):  # a tagger that knows one name: the predictor's own words, spans and offsets
        def logits(self, batch):
            tokens = [self.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
            tag = {"ann": 1, "smith": 2}
            return torch.tensor([[[5.0 if j == tag.get(t, 0) else 0.0 for j in range(3)] for t in row]
                                 for row in tokens])

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    predictor = Tagging(torch.nn.Identity(), tokenizer, ["O", "B-PER", "I-PER"], 32)
    text = "Yesterday Ann Smith wrote to bob@example.org from Paris"
    assert mask_text(text, names=names_from_predictor(predictor)) == "Yesterday [NAME] wrote to [EMAIL] from Paris"
    assert mask_text(text, names=names_from_predictor(predictor, types=("LOC",))) == \
        "Yesterday Ann Smith wrote to [EMAIL] from Paris"


def test_tokens_keep_their_count_so_tags_stay_aligned():
    tokens = ["Mail", "ann@example.org", "or", "call", "+1", "415", "555", "0100", "."]
    masked = mask_tokens(tokens)
    assert masked == ["Mail", "[EMAIL]", "or", "call", "[PHONE]", "[PHONE]", "[PHONE]", "[PHONE]", "."]


def test_an_error_quoting_a_row_shows_no_address():
    with pytest.raises(WorkbenchError, match=r"row 3 \('write to \[EMAIL\] or \[PHONE\]'\) has no label") as err:
        raise WorkbenchError("row 3 ('write to ann@example.org or +1 415 555 0100') has no label: add one")
    assert "ann@example.org" not in str(err.value) and "555" not in str(err.value)


def test_log_handlers_mask_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskingFilter())
    logger = logging.getLogger("test.privacy.masking")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("texts: %s", json.dumps(["mail ann@example.org"]))
        try:
            raise RuntimeError("boom with 415-555-0100")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "[EMAIL]" in written and "boom with [PHONE]" in written
    assert "ann@example.org" not in written and "555-0100" not in written


# --- each piece that stores data ------------------------------------------------------------------------------

def test_mode_all_masks_the_training_texts_and_says_how_many(tmp_path):
    from workbench.config import DataConfig
    from workbench.data import prepare

    path = tmp_path / "seeded.csv"
    rows = sentiment_rows(40)
    for row in rows[:8]:
        row["text"] += " mail ann@example.org or call 415-555-0100"
    _write_csv(path, rows)
    stored = prepare(DataConfig(source=str(path)), 0)
    assert stored.mask_personal == "stored" and stored.report.masked == {}
    assert sum("ann@example.org" in t for t in stored.train_texts + stored.eval_texts) == 8
    masked = prepare(DataConfig(source=str(path), mask_personal="all"), 0)
    assert masked.mask_personal == "all" and masked.report.masked == {"email": 8, "phone": 8}
    texts = masked.train_texts + masked.eval_texts
    assert not any("@" in t or "555" in t for t in texts)
    assert sum("[EMAIL] or call [PHONE]" in t for t in texts) == 8
    assert any("masked 16 personal items (8 email, 8 phone)" in note for note in masked.report.notes)


def test_worst_mistakes_are_masked_unless_off():
    from workbench.metrics import worst_mistakes

    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    texts = ["mail ann@example.org", "fine"]
    assert worst_mistakes(["a", "b"], np.array([1, 1]), probs, texts)[0]["text"] == "mail [EMAIL]"
    assert worst_mistakes(["a", "b"], np.array([1, 1]), probs, texts, mask_personal="off")[0]["text"] == texts[0]


def test_a_run_evaluation_keeps_its_mistakes_open_under_off():
    """The training loop's evaluation passes data.mask_personal on: "off" keeps the mistakes' texts as they are."""
    from workbench.tasks.classification import classification_result

    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    texts = ["mail ann@example.org", "fine"]
    y = np.array([1, 1])
    assert classification_result(1, 1.0, ["a", "b"], y, probs, 0.5, texts).mistakes[0]["text"] == "mail [EMAIL]"
    assert classification_result(1, 1.0, ["a", "b"], y, probs, 0.5, texts, "off").mistakes[0]["text"] == texts[0]


def test_the_classical_vocabulary_holds_no_address_or_number(tmp_path):
    from workbench.classical import VOCAB_FILE, ClassicalModel, fit_classifiers

    texts = [f"{w} film mail ann{i}@example.org call 415-555-01{i:02d}" for i, w in
             enumerate(["great", "awful"] * 10)]
    model = fit_classifiers(texts, [0, 1] * 10, ["pos", "neg"], ("none",))[0]
    model.save(tmp_path)
    saved = (tmp_path / VOCAB_FILE).read_text()
    assert "example" not in saved and "555" not in saved and "email" in saved
    again = ClassicalModel.load(tmp_path)
    assert again.masked
    np.testing.assert_allclose(again.probabilities(["great film mail bob@example.org"]),
                               again.probabilities(["great film mail [EMAIL]"]))
    plain = fit_classifiers(texts, [0, 1] * 10, ["pos", "neg"], ("none",), mask_personal="off")[0]
    assert not plain.masked and any("example" in t for t in plain.vectorizers["word"].vocabulary_)


def test_the_store_masks_records_unless_the_run_says_off(store):
    masked_run = store.create_run({"data": {"mask_personal": "stored"}})
    open_run = store.create_run({"data": {"mask_personal": "off"}})
    mistake = {"mistakes": [{"text": "mail ann@example.org"}]}
    for run in (masked_run, open_run):
        store.add_point(run, "eval", 1, mistake)
        store.set_info(run, {"data_notes": ["row with 415-555-0100"]})
        store.finish(run, "failed", error="bad row 'ann@example.org'")
    assert store.points(masked_run)[0]["mistakes"][0]["text"] == "mail [EMAIL]"
    assert store.get(masked_run)["info"]["data_notes"] == ["row with [PHONE]"]
    assert store.get(masked_run)["error"] == "bad row '[EMAIL]'"
    assert store.points(open_run)[0]["mistakes"][0]["text"] == "mail ann@example.org"
    assert store.get(open_run)["error"] == "bad row 'ann@example.org'"
    path = "/data/ann@example.org/runs/20261203-172049-4bce/eval/step-18.json"  # a file a reader opens
    store.add_point(masked_run, "event", 2, {"event": "checkpoint", "path": path})
    assert store.points(masked_run, "event")[-1]["path"] == path



def test_ner_rows_store_masked_tokens():
    from workbench.entities import Sentence
    from workbench.tasks.token_classification import masked_sentences, mistaken, stored_sentence

    tokens = ["Ann", "wrote", "ann@example.org", "from", "Paris"]
    assert stored_sentence(tokens, "stored") == ["Ann", "wrote", "[EMAIL]", "from", "Paris"]
    assert stored_sentence(tokens, "off") == tokens
    held = [Sentence(tokens, ["B-PER", "O", "O", "O", "B-LOC"], "x")]
    rows = mistaken(held, [["O"] * 5])
    assert rows[0]["text"] == "Ann wrote [EMAIL] from Paris" and rows[0]["gold"][0]["text"] == "Ann"
    counts: dict[str, int] = {}
    assert masked_sentences(held, counts)[0].tokens[2] == "[EMAIL]" and counts == {"email": 1}


def test_a_drift_snapshot_is_plain_masked_values():
    from workbench.deploy.monitor import Baseline, ServerMetrics

    metrics = ServerMetrics(["pos", "neg"], Baseline.from_eval(["pos", "neg"], [10, 20], "eval of ann@example.org"))
    metrics.observe_inputs([12, 40])
    metrics.observe_labels(["pos", "pos"])
    snapshot = metrics.snapshot()
    assert snapshot["samples"] == 2 and snapshot["live_labels"] == {"pos": 2}
    assert snapshot["source"] == "eval of [EMAIL]" and set(snapshot["psi"]) == {"predicted_label", "input_length"}


# --- end to end -------------------------------------------------------------------------------------------------

EMAILS = ["ann.lee@example.org", "j_smith+news@mail.example.co.uk", "ops-team@corp.example.com",
          "x.y.z@sub.example.net"]
PHONES = {"+1 415 555 0100": "14155550100", "(212) 555-0147": "2125550147", "646.555.0199": "6465550199",
          "312-555-0123": "3125550123", "+44 20 7946 0958": "442079460958", "+49 30 12345678": "493012345678"}
KEY = "wb-test-key-0123456789abcdef"


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _needles() -> list[bytes]:
    """Every seeded item as written, its phone numbers' digits alone, and their local parts."""
    items = EMAILS + list(PHONES) + list(PHONES.values()) + [d[-10:] for d in PHONES.values()]
    return sorted({s.encode() for s in items} | {e.split("@")[0].encode() for e in EMAILS if len(e) > 12})


def _found(root: Path) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path.relative_to(root)}: {n.decode()}" for n in _needles() if n in data]
    return hits


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tiny_model_dir):
    """A run trained on a file with e-mail addresses and phone numbers in a fifth of its texts, then asked
    to predict and serve texts that contain them; its home, record and the served log lines."""
    import workbench
    from workbench.config import Config
    from workbench.deploy.adapter import drift_baseline, load_served_model
    from workbench.deploy.app import ServeSettings, create_app
    from workbench.deploy.server import ThreadedServer, start_server, stop_server
    from workbench.predict import load_predictor
    from workbench.store import RunStore

    out = tmp_path_factory.mktemp("privacy")
    rows = sentiment_rows(100, seed=3)
    seeds = EMAILS + list(PHONES)
    for i, row in enumerate(rows[::5]):  # 20 of 100 rows
        row["text"] += f" contact {seeds[i % len(seeds)]} or {seeds[(i + 3) % len(seeds)]}"
    path = out / "seeded.csv"
    _write_csv(path, rows)
    assert {hit.split(": ", 1)[1] for hit in _found(out)} >= set(EMAILS) | set(PHONES)  # the search sees them
    home = out / "home"
    config = Config.from_dict({
        "model": str(tiny_model_dir), "data": {"source": str(path), "eval_fraction": 0.3},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 48, "warmup_ratio": 0.0,
                  "early_stopping_patience": 0, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})
    record = workbench.train(config, store=RunStore(home))
    assert record["status"] == "completed", record["error"]
    asked = [f"great film, write to {e} or call {p}" for e, p in zip(EMAILS, PHONES)]
    answers = load_predictor(record["id"], home).predict(asked)
    assert len(answers) == len(asked)

    served = load_served_model(record["id"], home)
    app, _ = create_app(served, ServeSettings(log_text=True), KEY,
                        baseline=lambda s: drift_baseline(RunStore(home).get(record["id"])))
    written = io.StringIO()  # the server log as `workbench serve` writes it: its handlers mask
    handler = logging.StreamHandler(written)
    capture = _Capture()  # the log records as the app makes them
    root, serve_log = logging.getLogger(), logging.getLogger("workbench.serve")
    level = serve_log.level
    root.addHandler(handler)
    serve_log.addHandler(capture)
    serve_log.setLevel(logging.INFO)
    try:
        mask_logging()
        with ThreadedServer(app) as url:
            for text in asked:
                r = httpx.post(url + "/v1/classify", json={"texts": [text]},
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                assert r.status_code == 200, r.text
    finally:
        for each in root.handlers:  # the filters stay with this test: other tests read their logs unmasked
            for f in [f for f in each.filters if isinstance(f, MaskingFilter)]:
                each.removeFilter(f)
        root.removeHandler(handler)
        serve_log.removeHandler(capture)
        serve_log.setLevel(level)
    info = start_server(record["id"], home, extra_args=["--log-text"])  # `workbench serve` as its own process
    try:
        for text in asked:
            r = httpx.post(info["url"] + "/v1/classify", json={"texts": [text]},
                           headers={"Authorization": f"Bearer {info['api_key']}"}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        stop_server(record["id"], home)
    return {"home": home, "record": RunStore(home).get(record["id"]), "written": written.getvalue(),
            "made": capture.lines}


class _Capture(logging.Handler):
    """Keeps each record's message as the app made it (before any handler's filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_run_folder_holds_no_seeded_address_or_number(seeded):
    run_dir = Path(seeded["record"]["dir"])
    assert (run_dir / "classical").is_dir() and (run_dir / "log.txt").is_file() and (run_dir / "eval").is_dir()
    server_log = (run_dir / "deploy" / "server.log").read_text()
    assert "classify texts" in server_log and "[EMAIL]" in server_log and "[PHONE]" in server_log
    assert _found(run_dir) == []


def test_the_run_store_holds_no_seeded_address_or_number(seeded):
    from workbench.store import RunStore

    home = seeded["home"]
    assert (home / "runs.sqlite").is_file()
    assert [h for h in _found(home) if not h.startswith("runs/")] == []  # runs.sqlite and its WAL
    evals = RunStore(home).points(seeded["record"]["id"], "eval")
    quoted = [m["text"] for p in evals for m in p["mistakes"]]
    assert not any("@" in t or "555" in t for t in quoted)


def test_the_served_log_masks_the_texts_it_was_sent(seeded):
    written = seeded["written"]
    assert not any(isinstance(f, MaskingFilter) for h in logging.getLogger().handlers for f in h.filters)
    assert "classify texts" in written and "[EMAIL]" in written and "[PHONE]" in written
    hits = [n.decode() for n in _needles() if n.decode() in written]
    assert hits == []


def test_request_log_lines_are_masked_where_they_are_made(seeded):
    made = "\n".join(seeded["made"])
    assert "classify texts" in made
    assert [n.decode() for n in _needles() if n.decode() in made] == []


def test_run_ids_and_date_times_are_never_taken_for_card_numbers():
    """A run id (20261203-002112-ab12) is 14 digits and a hyphen: as a card pattern with any separators it
    passed the Luhn check one time in ten and broke stored paths; cards are matched as issuers group them."""
    import random

    from workbench.privacy import mask_text

    rng = random.Random(0)
    for _ in range(2000):
        day, time_of_day = f"2026{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}", f"{rng.randint(0, 235959):06d}"
        run_id = f"{day}-{time_of_day}-{rng.randrange(16 ** 4):04x}"
        path = f"/home/u/runs/{run_id}/eval/step-12.json"
        assert mask_text(path) == path and mask_text(f"run {run_id} done") == f"run {run_id} done"
    for card in ("4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "3782 822463 10005"):
        assert mask_text(f"card {card} please") == "card [CARD] please"


def test_figures_with_a_decimal_point_are_not_phone_numbers():
    """A run's console prints figures such as perplexity 1337.6167: one decimal point makes a number, while a
    phone number written with points has two (415.555.0100)."""
    from workbench.privacy import mask_text

    for line in ("perplexity 1337.6167", "eval step 40: perplexity 48812.3320 eval_loss 10.7958",
                 "rmse 1234567.25"):
        assert mask_text(line) == line
    assert mask_text("call 415.555.0100 now") == "call [PHONE] now"
