"""``whiteboard demo``: the seed's experiment end to end, trained from scratch.

1. generate stories "NAME lives in COUNTRY . <fillers> PRONOUN speaks LANGUAGE ."
2. train an RNN and an LSTM (and a GRU when the time budget allows) on them, with the
   same parameter count and the same number of steps
3. ask each model for the next word after the seed's own prompt, and after the same clue
   followed by over 100 tokens of filler
4. measure accuracy by distance, and write a plot and an HTML summary
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from whiteboard import experiments as ex
from whiteboard.experiments import horizon as memory_horizon
from whiteboard.experiments import tasks
from whiteboard.lm.checkpoint import atomic_write_text, save_model, save_run_files
from whiteboard.lm.config import RunConfig
from whiteboard.lm.generate import predict_next
from whiteboard.inspect.traces import build_report, lm_gradient_reach
from whiteboard.inspect.plots import band_plot, line_plot
from whiteboard.inspect.report import demo_report, esc, inline_png


@dataclass
class DemoSettings:
    steps: int = 1400  # per model
    max_distance: int = 150  # the longest lag trained on
    # log-spaced from the shortest possible lag; 250 and 400 lie beyond what was trained
    distances: tuple[int, ...] = (4, 6, 10, 16, 25, 40, 63, 100, 150, 250, 400)
    test_per_distance: int = 200
    hidden: int = 64  # the LSTM's; RNN and GRU get the hidden size with the same parameter count
    budget_s: float = 300.0  # GRU is trained only if RNN + LSTM left enough of this
    long_filler_tokens: int = 100
    seed: int = 0


QUICK = DemoSettings(steps=40, max_distance=12, distances=(4, 6, 10, 16), test_per_distance=20, hidden=16,
                     budget_s=60.0, long_filler_tokens=100)


def run_demo(out_dir: Path, settings: DemoSettings = DemoSettings(), progress: bool = True,
             say: Callable[[str], None] = print) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vocab = ex.story_vocabulary()
    build = lambda cell, h: ex.story_model(cell, len(vocab), h)  # noqa: E731
    sizes = ex.hidden_sizes(["rnn", "lstm", "gru"], settings.hidden, "params", build)
    curriculum = ex.default_curriculum(settings.max_distance, settings.steps)
    say("whiteboard demo - the seed's experiment: can the network still read 'France' when it has to say 'French'?")
    say(f"Stories: 'NAME lives in COUNTRY .' + filler sentences + 'PRONOUN speaks LANGUAGE .', "
        f"{len(tasks.COUNTRY_LANGUAGE)} countries, clue-answer distance up to {settings.max_distance} tokens; "
        f"{settings.steps} training steps of 32 stories per model, same parameter count, each model at its own "
        "learning rate (its best in a validation sweep) and with its literature's initialisation.")

    models: dict[str, torch.nn.Module] = {}
    train_seconds: dict[str, float] = {}
    for cell in ("rnn", "lstm", "gru"):
        elapsed = time.perf_counter() - started
        if cell == "gru" and train_seconds and elapsed + max(train_seconds.values()) > settings.budget_s * 0.8:
            say(f"(skipping the GRU: {elapsed:.0f} s of the {settings.budget_s:.0f} s budget used)")
            break
        torch.manual_seed(settings.seed)  # each model's initial weights from the seed, whatever ran before
        model = build(cell, sizes[cell])
        t0 = time.perf_counter()
        ex.train_story_model(model, vocab, curriculum, lr=ex.STORY_LR[cell], seed=settings.seed, progress=progress,
                             desc=f"training {cell.upper():4s}")
        train_seconds[cell] = time.perf_counter() - t0
        models[cell] = model
        run_dir = out_dir / "models" / cell
        config = RunConfig()
        config.model = model.config
        config.data.corpus = "stories"
        save_run_files(run_dir, config, vocab)
        save_model(run_dir, model, curriculum.total_steps)

    # (a) the seed's own prompt, (b) the same clue a long way back
    long_prompt = tasks.long_seed_prompt(settings.long_filler_tokens)
    long_distance = len(long_prompt.split()) - 3
    prompts = {"seed": tasks.SEED_PROMPT_TYPED, "long": long_prompt}
    predictions = {name: {cell: [asdict(p) for p in predict_next(m, vocab, text, 5)] for cell, m in models.items()}
                   for name, text in prompts.items()}
    for name, title in (("seed", f"The seed's prompt (clue {len(tasks.SEED_PROMPT.split()) - 3} tokens back):"),
                        ("long", f"The same clue {long_distance} tokens back:")):
        say("")
        say(title)
        say(f"  \"{_shorten(prompts[name])}\"")
        for cell, preds in predictions[name].items():
            top = ", ".join(f"{p['token']} {p['probability']:.2f}" for p in preds)
            say(f"  {cell.upper():4s} -> {top}")

    # (c) accuracy by distance on held-out stories
    rows = []
    for d in settings.distances:
        stories = tasks.make_stories(settings.test_per_distance, d, d, settings.seed + 1, "test")
        for cell, model in models.items():
            score = ex.score_stories(ex.lm_logits(model), stories, vocab)
            rows.append({"model": cell, "distance": d, "accuracy": score.accuracy, "mean_probability": score.mean_probability})
    say("")
    say("Accuracy (top-1 over the whole vocabulary) on held-out stories, by distance in tokens:")
    say("  distance " + " ".join(f"{c.upper():>7}" for c in models))
    for d in settings.distances:
        say(f"  {d:>8} " + " ".join(f"{_row(rows, c, d)['accuracy']:>7.2f}" for c in models))
    horizons = {c: memory_horizon.horizon({r["distance"]: r["accuracy"] for r in rows if r["model"] == c},
                                          floor=2 * ex.chance_level("stories")) for c in models}
    say("Memory horizon (where accuracy falls to half its value at <= 10 tokens): " + ", ".join(
        f"{c.upper()} {_horizon_words(h, max(settings.distances))}"
        for c, h in horizons.items()))

    series = {c.upper(): [(r["distance"], r["accuracy"]) for r in rows if r["model"] == c] for c in models}
    plot_png = band_plot({name: [(d, a, a, a) for d, a in points] for name, points in series.items()},
                         out_dir / "accuracy_by_distance.png", xlabel="tokens between 'COUNTRY' and the answer (log scale)",
                         ylabel="accuracy of the language", title="Who still remembers the country?",
                         reference=(ex.chance_level("stories"), "chance"))
    result = {
        "settings": asdict(settings), "hidden": {c: sizes[c] for c in models},
        "parameters": {c: sum(p.numel() for p in m.parameters()) for c, m in models.items()},
        "train_seconds": train_seconds, "prompts": prompts, "predictions": predictions, "accuracy": rows,
        "learning_rates": {c: ex.STORY_LR[c] for c in models},
        "horizons": {c: _horizon_words(h, max(settings.distances)) for c, h in horizons.items()},
        "total_seconds": time.perf_counter() - started,
    }
    extra = _inspection_sections(out_dir, models, vocab, prompts, result, say)
    atomic_write_text(out_dir / "results.json", json.dumps(result, indent=2))
    demo_report(out_dir / "summary.html", result, plot_png, extra_sections=extra)
    say("")
    say(f"Wrote {out_dir / 'summary.html'}, {out_dir / 'accuracy_by_distance.png'}, {out_dir / 'results.json'} "
        f"and the models in {out_dir / 'models'} ({result['total_seconds']:.0f} s in all)")
    served = " ".join(shlex.quote(str(out_dir / "models" / cell)) for cell in models)
    say(f"Next, watch them write, read and forget on your own sentences: whiteboard serve {served}")
    return result


def _horizon_words(horizon: float, largest: int) -> str:
    if horizon != horizon:  # NaN
        return "none (the task was not learned)"
    return f"beyond {largest} tokens" if horizon == float("inf") else f"{horizon:.0f} tokens"


def _row(rows: list[dict], cell: str, distance: int) -> dict:
    return next(r for r in rows if r["model"] == cell and r["distance"] == distance)


def _shorten(text: str, keep: int = 60) -> str:
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"


def _inspection_sections(out_dir: Path, models: dict, vocab, prompts: dict, result: dict, say) -> str:
    """Gate heatmaps of the RNN and LSTM on both prompts, and every model's gradient reach
    on the long prompt: the views of ``whiteboard inspect`` / ``reach``, for the summary."""
    parts = ["<h2>4. What each network writes, reads and forgets</h2>",
             "<p>Every column is a token, every row one unit (the 12 most active). Interactive versions, with the "
             "model's predictions at every token: "]
    links, images = [], []
    for cell in [c for c in ("rnn", "lstm") if c in models]:
        for name in ("seed", "long"):
            page_path = out_dir / "inspect" / f"{cell}-{name}.html"
            built = build_report(models[cell], vocab, prompts[name], page_path, unit_count=12,
                                 title=f"whiteboard demo: the {cell.upper()} on the {name} prompt")
            links.append(f'<a href="inspect/{esc(page_path.name)}">{cell.upper()}, {name} prompt</a>')
            png = Path(built["files"]["layer0"]).read_bytes()
            images.append(f"<h3>{cell.upper()} on the {name} prompt</h3>{inline_png(png, f'{cell} {name} heatmaps')}")
    parts.append(", ".join(links) + ".</p>")
    parts.extend(images)
    reach = {cell.upper(): lm_gradient_reach(model, vocab, prompts["long"]).tolist() for cell, model in models.items()}
    result["gradient_reach_long_prompt"] = reach
    png = line_plot({n: list(enumerate(v)) for n, v in reach.items()}, out_dir / "gradient_reach.png",
                    xlabel="lag k (tokens back)", ylabel="mean ||d loss_t / d input_{t-k}||", logy=True,
                    title="How much of the error at step t reaches step t-k")
    lags = [k for k in (1, 5, 10, 25, 50, 100) if k < min(len(v) for v in reach.values())]
    rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{v[k]:.2e}</td>" for v in reach.values()) + "</tr>" for k in lags)
    parts.append("<h2>5. How far back the error reaches</h2><p>The seed: on an overwritten board we \"wouldn't be able "
                 "to find how much error was caused due to whatever we calculated at timestep t - k\". Measured on the "
                 "long prompt: the mean norm of the gradient of the loss at step t with respect to the input at t-k.</p>"
                 + inline_png(png, "gradient reach")
                 + "<table><thead><tr><th>lag k</th>" + "".join(f"<th>{esc(n)}</th>" for n in reach)
                 + f"</tr></thead><tbody>{rows}</tbody></table>")
    if lags:
        k = lags[-1]
        say("")
        say(f"Gradient reach on the long prompt, {k} tokens back: "
            + ", ".join(f"{n} {v[k]:.1e}" for n, v in reach.items()) + f" (plot: {out_dir / 'gradient_reach.png'})")
    return "\n".join(parts)
