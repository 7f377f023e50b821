"""The ``whiteboard`` command. Parsing and calling only; the work lives in the library.

The entry point is ``main(argv) -> int`` so tests drive it directly.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from whiteboard import commands
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
  serve      whiteboard serve demo-out/models/rnn demo-out/models/lstm demo-out/models/gru
  reach      whiteboard reach demo-out/models/rnn demo-out/models/lstm --text "Alice lives in France . She speaks"
  export     whiteboard export runs/mine --format torch --out exported/mine

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
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train data-parallel on N processes of this machine (starts torchrun; for several "
                        "machines run torchrun -m whiteboard train yourself)")
    _add_device(p, default=None)  # absent: the config's train.device (auto)


def _add_device(p, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default,
                   help="cpu, cuda, cuda:N or auto (default: CUDA where this machine has it, else the CPU)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="perplexity (and bits per char) of a trained model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--corpus", help="evaluate on another corpus (named, file or folder) instead of the run's own")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_device(p)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="the most likely next tokens after a text")
    p.add_argument("run_dir", type=Path)
    p.add_argument("text")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    _add_device(p)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", default="")
    p.add_argument("--length", type=int, default=100, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
    p.add_argument("--seed", type=int)
    _add_device(p)


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
    _add_device(p)


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
    p.add_argument("text", nargs="?", help="the text to report on (not needed with --corpus)")
    p.add_argument("--corpus", type=Path, help="a UTF-8 text file whose states --export-states writes")
    p.add_argument("--export-states", type=Path, metavar="FILE.h5",
                   help="with --corpus: the corpus's states in the layout LSTMVis reads (HDF5; the word ids, "
                        "their dictionary and lstm.yml go beside it)")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file; heatmap PNGs go beside it")
    p.add_argument("--units", type=_unit_list, help="comma-separated unit indices to show (default: the most active)")
    p.add_argument("--top-units", type=int, default=12, help="how many of the most active units to show")
    p.add_argument("--pattern", help="find units that follow a pattern: inside-quotes, line-position, word-position, regex:EXPR")
    p.add_argument("--reach", action="store_true", help="add this model's gradient reach to the report")
    _add_device(p)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="the live whiteboard: a local web page to explore trained models side by side")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="the port (0: any free one)")
    p.add_argument("--corpus", type=Path, action="append", default=[], metavar="FILE",
                   help="a UTF-8 text file the page may scan (select and match); repeat for more")
    _add_device(p)


def _add_reach(sub) -> None:
    p = sub.add_parser("reach", help="how far back the gradient reaches, for one or more trained models")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--text", required=True, help="the text to measure on (tokens the models know)")
    p.add_argument("--max-lag", type=int)
    p.add_argument("--out", type=Path, default=Path("reach.png"))
    p.add_argument("--json", action="store_true")
    _add_device(p)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a trained run for plain PyTorch (no whiteboard needed) or for ONNX")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=["torch", "onnx"], default="torch",
                   help="torch: model.safetensors + load_model.py for torch.nn; onnx: model.onnx")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the export (never an existing one)")


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
    _add_export(sub)
    _add_serve(sub)
    return parser


def _err(message: str) -> None:
    print(f"whiteboard: error: {message}", file=sys.stderr)


COMMANDS = {"train": commands.cmd_train, "evaluate": commands.cmd_evaluate, "predict": commands.cmd_predict,
            "generate": commands.cmd_generate, "compare": commands.cmd_compare, "demo": commands.cmd_demo,
            "inspect": commands.cmd_inspect, "reach": commands.cmd_reach, "export": commands.cmd_export,
            "serve": commands.cmd_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that starts itself again (--nproc)
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
