"""The ``whiteboard`` command. Parsing and calling only; the work lives in the library.

The entry point is ``main(argv) -> int`` so tests drive it directly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from whiteboard.errors import UsageError, WhiteboardError

EXAMPLES = """\
commands, each with one example:
  train      whiteboard train my_text.txt --run-dir runs/mine --set train.epochs=5
  evaluate   whiteboard evaluate runs/mine --split test
  predict    whiteboard predict runs/mine "Alice lives in France . She speaks"
  generate   whiteboard generate runs/mine --prompt "The" --length 50 --temperature 0.8
  compare    whiteboard compare --task stories --models rnn,lstm,gru --distances 10,50,100,150
  demo       whiteboard demo --out demo-out
  inspect    whiteboard inspect demo-out/models/lstm "Alice lives in France . She speaks" --out report.html
  reach      whiteboard reach demo-out/models/rnn demo-out/models/lstm --text "Alice lives in France . She speaks"

'whiteboard COMMAND --help' shows a command's options.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str):
        # Every error starts "whiteboard: error:", a subcommand's too (argparse would write
        # "whiteboard evaluate: error:"); the command is named in the help hint instead.
        self.exit(2, f"whiteboard: error: {message} (see '{self.prog} --help')\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a language model on a corpus",
                       description="Train a language model. Config layers: defaults < --preset < --config < --set.")
    p.add_argument("corpus", nargs="?", help="named corpus (ptb, wikitext-2, tinyshakespeare), a UTF-8 text file, or a folder")
    p.add_argument("--run-dir", type=Path, help="where checkpoints, config, vocabulary and metrics go")
    p.add_argument("--preset", help="a named configuration (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--config", type=Path, help="a TOML file with [model], [data], [train] tables")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config key")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run exactly where it stopped")
    p.add_argument("--data-dir", help="where named corpora are found (default $WHITEBOARD_DATA_DIR)")
    p.add_argument("--download", action="store_true", help="fetch a missing named corpus into the data dir")
    p.add_argument("--level", choices=["word", "char"], help="tokenize by words or characters")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --run-dir (its files are deleted first)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="perplexity (and bits per char) of a trained model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--corpus", help="evaluate on another corpus (named, file or folder) instead of the run's own")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="the most likely next tokens after a text")
    p.add_argument("run_dir", type=Path)
    p.add_argument("text")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", default="")
    p.add_argument("--length", type=int, default=100, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
    p.add_argument("--seed", type=int)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="RNN vs LSTM vs GRU on a long-range task, by distance",
                       description="Train each model with the same step budget (and by default the same parameter "
                                   "count) and measure it at each distance between clue and answer.")
    p.add_argument("--task", choices=["stories", "adding", "copy"], default="stories")
    p.add_argument("--models", default="rnn,lstm,gru",
                   help="comma-separated from rnn (ReLU, identity init), lstm, gru, rnn-tanh (orthogonal init)")
    p.add_argument("--distances", type=_int_list,
                   help="stories: tokens between clue and answer (default 4,6,10,16,25,40,63,100,150); "
                        "adding: sequence length; copy: blank delay (default 10,50,100,150)")
    p.add_argument("--lrs", type=_float_list, metavar="LR,LR,...",
                   help="a learning-rate sweep: each model keeps its best rate on validation data")
    p.add_argument("--seeds", type=int, default=1, help="train each model with this many seeds (horizon intervals)")
    p.add_argument("--train-max", type=int, metavar="TOKENS",
                   help="stories: train on lags up to this many tokens (default: the largest distance)")
    p.add_argument("--steps", type=int, default=1400, help="training steps per model (and per distance for adding/copy)")
    p.add_argument("--hidden", type=int, default=64, help="the LSTM's hidden size")
    p.add_argument("--match", choices=["params", "hidden"], default="params",
                   help="give every model the LSTM's parameter count (default) or its hidden size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("compare-out"), help="folder for results.json, results.csv, plot.png")
    p.add_argument("--quiet", action="store_true")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return values


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the seed's experiment: 'She speaks' -> French?, trained from scratch")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--quick", action="store_true", help="a seconds-long run that exercises every step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="an HTML report of every gate and state over a text")
    p.add_argument("run_dir", type=Path)
    p.add_argument("text")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file; heatmap PNGs go beside it")
    p.add_argument("--units", type=_unit_list, help="comma-separated unit indices to show (default: the most active)")
    p.add_argument("--top-units", type=int, default=12, help="how many of the most active units to show")
    p.add_argument("--pattern", help="find units that follow a pattern: inside-quotes, line-position, word-position, regex:EXPR")
    p.add_argument("--reach", action="store_true", help="add this model's gradient reach to the report")


def _add_reach(sub) -> None:
    p = sub.add_parser("reach", help="how far back the gradient reaches, for one or more trained models")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--text", required=True, help="the text to measure on (tokens the models know)")
    p.add_argument("--max-lag", type=int)
    p.add_argument("--out", type=Path, default=Path("reach.png"))
    p.add_argument("--json", action="store_true")


def _unit_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated unit indices, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no units given")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="whiteboard", description="Recurrent sequence models you can see into.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from whiteboard import __version__

    parser.add_argument("--version", action="version", version=f"whiteboard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_generate(sub)
    _add_compare(sub)
    _add_demo(sub)
    _add_inspect(sub)
    _add_reach(sub)
    return parser


def _err(message: str) -> None:
    print(f"whiteboard: error: {message}", file=sys.stderr)


def check_writable_folder(folder: Path, option: str) -> None:
    """Before any work: the folder an output goes to exists (or can be made) and takes files."""
    folder = folder if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WhiteboardError(f"{option}: cannot create the folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WhiteboardError(f"{option}: the folder {folder} is not writable")


def cmd_train(args) -> int:
    from whiteboard.lm import config as cfg
    from whiteboard.lm.train import train

    if args.list_presets:
        for name in cfg.preset_names():
            print(name)
        return 0
    sets = list(args.set)
    if args.corpus:
        sets.append(f"data.corpus={args.corpus}")
    if args.data_dir:
        sets.append(f"data.data_dir={args.data_dir}")
    if args.download:
        sets.append("data.download=true")
    if args.level:
        sets.append(f"data.level={args.level}")
    if args.resume:
        from whiteboard.lm.checkpoint import read_config
        from whiteboard.lm.rundir import CONFIG

        if args.preset or args.config or args.overwrite:
            raise UsageError("--resume continues a run with its saved config; only --set may change it")
        saved = args.resume / CONFIG
        if not saved.exists():
            raise WhiteboardError(f"nothing to resume: {saved} not found")
        config = cfg.resolve(base=read_config(saved).to_dict(), sets=sets)
        run_dir = args.resume
    else:
        if not args.run_dir:
            raise UsageError("train needs --run-dir (where the checkpoints go), or --resume RUN_DIR")
        config = cfg.resolve(args.preset, args.config, sets)
        run_dir = args.run_dir
    result = train(config, run_dir, resume=bool(args.resume), progress=not args.quiet,
                   log=lambda m: print(m, file=sys.stderr), overwrite=args.overwrite)
    if result.already_finished:
        print(f"{run_dir} has finished already; evaluate it with: whiteboard evaluate {run_dir}")
        return 0
    print(result.summary())
    if result.interrupted:
        print(f"interrupted: checkpoint saved; continue with: whiteboard train --resume {run_dir}", file=sys.stderr)
        return 143 if result.signal == signal.SIGTERM else 130
    return 0


def cmd_evaluate(args) -> int:
    from whiteboard.lm.checkpoint import load_run
    from whiteboard.lm.evaluation import bits_per_char, evaluate, perplexity, prepare_data

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    model, vocab, config = load_run(args.run_dir)
    if args.corpus:
        config.data.corpus = args.corpus
    if args.data_dir:
        config.data.data_dir = args.data_dir
    data = prepare_data(config, vocab)
    ids = data.ids.get(args.split)
    if ids is None or ids.numel() // args.batch_size < 2:
        raise WhiteboardError(f"the {args.split} split of {config.data.corpus} is empty or too short to evaluate")
    loss = evaluate(model, ids, args.batch_size, config.train.bptt, "cpu")
    result = {"split": args.split, "corpus": config.data.corpus, "loss": loss, "perplexity": perplexity(loss),
              "tokens": int(ids.numel())}
    if vocab.level == "char":
        result["bits_per_char"] = bits_per_char(loss)
    if args.json:
        print(json.dumps(result))
    else:
        line = f"{args.split}: loss {loss:.4f}, perplexity {result['perplexity']:.2f}"
        if "bits_per_char" in result:
            line += f", {result['bits_per_char']:.4f} bits/char"
        print(line + f" over {result['tokens']:,} tokens")
    return 0


def cmd_predict(args) -> int:
    from whiteboard.lm.checkpoint import load_run
    from whiteboard.lm.generate import predict_next

    if args.top_k <= 0:
        raise UsageError(f"--top-k must be positive, got {args.top_k}")
    model, vocab, _ = load_run(args.run_dir)
    unknown = vocab.unknown(args.text)
    predictions = predict_next(model, vocab, args.text, args.top_k)
    if args.json:
        print(json.dumps({"text": args.text, "unknown": unknown,
                          "predictions": [{"token": p.token, "probability": p.probability} for p in predictions]}))
        return 0
    if unknown:
        print(f"note: not in the vocabulary, read as <unk>: {', '.join(unknown)}", file=sys.stderr)
    width = max(len(repr(p.token)) for p in predictions)
    for p in predictions:
        print(f"{p.token!r:<{width}}  {p.probability:.4f}")
    return 0


def cmd_generate(args) -> int:
    from whiteboard.lm.checkpoint import load_run
    from whiteboard.lm.generate import MAX_LENGTH, generate_pieces

    if not 0 <= args.temperature < math.inf:
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = no top-k filtering), got {args.top_k}")
    if not 0 <= args.length <= MAX_LENGTH:
        raise UsageError(f"--length must be in [0, {MAX_LENGTH:,}], got {args.length:,}")
    model, vocab, _ = load_run(args.run_dir)
    unknown = vocab.unknown(args.prompt) if args.prompt else []
    if unknown:
        print(f"note: not in the vocabulary, read as <unk>: {', '.join(unknown)}", file=sys.stderr)
    # Streamed: each token is printed as it is sampled.
    sys.stdout.write(args.prompt)
    for piece in generate_pieces(model, vocab, args.prompt, args.length, args.temperature, args.top_k, args.top_p,
                                 args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_compare(args) -> int:
    from whiteboard import experiments as ex

    cells = [c.strip() for c in args.models.split(",") if c.strip()]
    unknown = [c for c in cells if c not in ex.CELLS]
    if unknown or not cells:
        raise UsageError(f"--models takes names from {', '.join(ex.CELLS)}, got {args.models!r}")
    if args.steps < 1 or args.hidden < 1 or args.seeds < 1 or (args.train_max is not None and args.train_max < 4):
        raise UsageError("--steps, --hidden and --seeds must be positive, and --train-max at least 4")
    distances = args.distances or (ex.STORY_DISTANCES if args.task == "stories" else [10, 50, 100, 150])
    check_writable_folder(args.out, "--out")
    result = ex.compare(args.task, cells, distances, args.steps, args.hidden, args.match, args.seed,
                        progress=not args.quiet, log=lambda m: print(m, file=sys.stderr), learning_rates=args.lrs,
                        seeds=args.seeds, train_max=args.train_max)
    files = ex.write_compare(result, args.out)
    print(result.table())
    print(f"wrote {files['json']}, {files['csv']}, {files['plot']}")
    return 0


def cmd_demo(args) -> int:
    from whiteboard.experiments.demo import QUICK, DemoSettings, run_demo

    run_demo(args.out, QUICK if args.quick else DemoSettings(), progress=not args.quiet)
    return 0


def cmd_inspect(args) -> int:
    from whiteboard.lm.checkpoint import load_run
    from whiteboard.inspect.traces import build_report

    if args.top_units < 1:
        raise UsageError(f"--top-units must be positive, got {args.top_units}")
    check_writable_folder(args.out.parent, "--out")
    model, vocab, _ = load_run(args.run_dir)
    result = build_report(model, vocab, args.text, args.out, units=args.units, unit_count=args.top_units,
                          pattern=args.pattern, reach_models={model.config.cell.upper(): model} if args.reach else None,
                          title=f"whiteboard inspect: {args.run_dir}")
    if result["trace"].unknown:
        print(f"note: not in the vocabulary, read as <unk>: {', '.join(result['trace'].unknown)}", file=sys.stderr)
    print("wrote " + ", ".join(result["files"].values()))
    return 0


def cmd_reach(args) -> int:
    from whiteboard.lm.checkpoint import load_run
    from whiteboard.inspect.traces import lm_gradient_reach
    from whiteboard.inspect.plots import line_plot

    if args.max_lag is not None and args.max_lag < 1:
        raise UsageError(f"--max-lag must be positive, got {args.max_lag}")
    check_writable_folder(args.out.parent, "--out")
    curves = {}
    for run_dir in args.run_dirs:
        model, vocab, config = load_run(run_dir)
        name = config.model.cell.upper()
        if name in curves:
            name = f"{name} ({run_dir})"
        curves[name] = lm_gradient_reach(model, vocab, args.text, args.max_lag).tolist()
    line_plot({n: list(enumerate(v)) for n, v in curves.items()}, args.out, xlabel="lag k (tokens back)",
              ylabel="mean ||d loss_t / d input_{t-k}||", title="gradient reach", logy=True)
    if args.json:
        print(json.dumps(curves))
    else:
        longest = max(len(v) for v in curves.values())
        lags = sorted({0, 1, 2, 5, 10, 20, 50, 100, 200, longest - 1} & set(range(longest)))
        print(f"{'lag':>5} " + " ".join(f"{n:>12}" for n in curves))
        for k in lags:
            print(f"{k:>5} " + " ".join(f"{v[k]:>12.3e}" if k < len(v) else f"{'-':>12}" for v in curves.values()))
        print(f"wrote {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "generate": cmd_generate,
            "compare": cmd_compare, "demo": cmd_demo, "inspect": cmd_inspect, "reach": cmd_reach}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except WhiteboardError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except OSError as exc:  # a full disk, a file vanished under us: what and where, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        _err(f"{exc.strerror or exc}{where}")
        return 1


def console_main() -> None:
    sys.exit(main(sys.argv[1:]))
