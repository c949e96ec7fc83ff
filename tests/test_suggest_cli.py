"""`workbench suggest RUN --pool FILE -n N`: N rows of the pool, none already in the run's data, each once."""

from __future__ import annotations

import csv
import json

from workbench.cli import main
from workbench.loop import train

from conftest import sentiment_rows


def test_suggest_prints_n_unlabelled_pool_rows(tiny_config, tiny_csv, store, tmp_path, capsys):
    record = train(tiny_config(train={"epochs": 1}), store=store)
    labelled = [r["text"] for r in csv.DictReader(open(tiny_csv, encoding="utf-8"))]
    fresh = [r["text"] + " new" for r in sentiment_rows(40, seed=5)]
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join([*labelled[:15], *fresh, fresh[0]]), encoding="utf-8")
    capsys.readouterr()  # the training run's lines
    code = main(["--home", str(store.home), "suggest", record["id"], "--pool", str(pool), "-n", "20", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and len(rows) == 20
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == 20 and not set(texts) & set(labelled), "no labelled or repeated text"
    assert all(r["strategy"] == "balanced-density" for r in rows) and [r["rank"] for r in rows] == list(range(1, 21))
    code = main(["--home", str(store.home), "suggest", record["id"], "--pool", str(pool), "-n", "3"])
    out = capsys.readouterr().out
    assert code == 0 and len(out.strip().splitlines()) == 4 and "balanced-density" in out
    code = main(["--home", str(store.home), "suggest", record["id"], "--pool", str(tmp_path / "none.txt")])
    assert code == 2 and "none.txt" in capsys.readouterr().err
