"""What each ``whiteboard`` command does, given its parsed arguments (the parser is
:mod:`whiteboard.cli`). Each imports what it needs when it runs, so ``whiteboard --help``
and a usage error never wait for torch."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

from whiteboard.errors import UsageError, WhiteboardError


def _device(args) -> str:
    """The command's --device, checked and with auto resolved."""
    from whiteboard.lm.config import check_device, resolve_device

    check_device(args.device, "--device")
    return resolve_device(args.device)


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
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    sets = list(args.set)
    if args.device:
        sets.append(f"train.device={args.device}")
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
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from whiteboard.lm.distributed import World

        World(size=args.nproc).check_batch(config.train.batch_size)  # refused here, once, before any start
        return _start_torchrun(args.nproc, args.argv)
    result = train(config, run_dir, resume=bool(args.resume), progress=not args.quiet,
                   log=lambda m: print(m, file=sys.stderr), overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports for the job
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
    model, vocab, config = load_run(args.run_dir, _device(args))
    if args.corpus:
        config.data.corpus = args.corpus
    if args.data_dir:
        config.data.data_dir = args.data_dir
    data = prepare_data(config, vocab)
    ids = data.ids.get(args.split)
    if ids is None or ids.numel() // args.batch_size < 2:
        raise WhiteboardError(f"the {args.split} split of {config.data.corpus} is empty or too short to evaluate")
    loss = evaluate(model, ids, args.batch_size, config.train.bptt, _device(args))
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
    model, vocab, _ = load_run(args.run_dir, _device(args))
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
    model, vocab, _ = load_run(args.run_dir, _device(args))
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
    device = _device(args)
    result = ex.compare(args.task, cells, distances, args.steps, args.hidden, args.match, args.seed,
                        progress=not args.quiet, log=lambda m: print(m, file=sys.stderr), learning_rates=args.lrs,
                        seeds=args.seeds, train_max=args.train_max, device=device)
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
    if (args.corpus is None) != (args.export_states is None):
        raise UsageError("--corpus and --export-states go together: the states of which corpus, written where?")
    if args.corpus is None and args.text is None:
        raise UsageError("give a text to inspect, or --corpus FILE --export-states FILE.h5")
    if args.corpus is not None:
        return _export_states(args)
    check_writable_folder(args.out.parent, "--out")
    model, vocab, _ = load_run(args.run_dir, _device(args))
    result = build_report(model, vocab, args.text, args.out, units=args.units, unit_count=args.top_units,
                          pattern=args.pattern, reach_models={model.config.cell.upper(): model} if args.reach else None,
                          title=f"whiteboard inspect: {args.run_dir}")
    if result["trace"].unknown:
        print(f"note: not in the vocabulary, read as <unk>: {', '.join(result['trace'].unknown)}", file=sys.stderr)
    print("wrote " + ", ".join(result["files"].values()))
    return 0


def _export_states(args) -> int:
    from whiteboard.explorer.corpus import Corpus, export_states
    from whiteboard.explorer.server import load_served

    corpus = Corpus.from_file(args.corpus)
    check_writable_folder(args.export_states.parent, "--export-states")
    (run,) = load_served([args.run_dir], _device(args))
    files = export_states(run, corpus, args.export_states)
    print("wrote " + ", ".join(str(p) for p in files.values()) + f" (open the folder with LSTMVis: "
          f"python lstm_server.py -dir {args.export_states.parent or '.'})")
    return 0


def cmd_serve(args) -> int:
    try:
        from whiteboard.explorer import server
    except ImportError as exc:
        raise WhiteboardError(f"whiteboard serve needs FastAPI and uvicorn ({exc.name} is missing): "
                              "pip install 'whiteboard[serve]'") from None
    from whiteboard.explorer.analysis import short_names
    from whiteboard.explorer.corpus import Corpus, demo_corpus

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    names = short_names(args.corpus) if args.corpus else []
    corpora = [Corpus.from_file(path, name) for path, name in zip(args.corpus, names)] + [demo_corpus()]
    runs = server.load_served(args.run_dirs, _device(args))
    server.serve(runs, corpora, args.host, args.port)
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
        model, vocab, config = load_run(run_dir, _device(args))
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


def cmd_export(args) -> int:
    from whiteboard.lm.checkpoint import load_run
    from whiteboard.lm.export import export_run

    model, vocab, _ = load_run(args.run_dir)
    written = export_run(model, vocab, args.out, args.format)
    print(f"wrote {args.out}: {', '.join(p.name for p in written)}")
    if args.format == "torch":
        print(f"load it with: import sys; sys.path.insert(0, '{args.out}'); from load_model import load; "
              f"model, vocab = load('{args.out}')")
    return 0


def _start_torchrun(nproc: int, argv: list[str]) -> int:
    """``whiteboard train ... --nproc N``: the same command under torchrun on this machine,
    one process per share of the batch. Returns torchrun's exit status (non-zero when any
    process failed; torchrun then stops the others)."""
    import subprocess

    rest, skip = [], False
    for arg in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "whiteboard", *rest]
    print(f"starting {nproc} processes: torchrun --standalone --nproc-per-node={nproc} -m whiteboard "
          + " ".join(rest), file=sys.stderr)
    return subprocess.run(command).returncode
