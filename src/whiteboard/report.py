"""Self-contained HTML pages: every style, script and image is inlined, so a report opens
from ``file://`` with no network and can be mailed as one file."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .checkpoint import atomic_write_text

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } td, th { padding: .25em .7em; border: 1px solid #ddd; }
th { background: #f4f4f4; } .prompt { font-family: ui-monospace, monospace; background: #f7f7f7; padding: .5em;
       white-space: pre-wrap; } .good { color: #116611; font-weight: 600; } .bad { color: #aa2222; }
img { max-width: 100%; } .note { color: #666; font-size: .92em; }
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def inline_png(data: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def page(title: str, body: str, script: str = "") -> str:
    script_tag = f"<script>\n{script}\n</script>" if script else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{esc(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n{script_tag}\n</body>\n</html>\n")


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _prediction_table(predictions: dict, answer: str) -> str:
    rows = []
    for cell, preds in predictions.items():
        cells = []
        for p in preds:
            css = "good" if p["token"] == answer else ""
            cells.append(f'<span class="{css}">{esc(p["token"])}</span> {p["probability"]:.2f}')
        rows.append([esc(cell.upper())] + cells)
    return table(["model", "1st", "2nd", "3rd", "4th", "5th"], rows)


def demo_report(path: Path, result: dict, plot_png: bytes, models=None, vocab=None, extra_sections: str = "") -> None:
    """The demo's one-page summary."""
    prompts, predictions = result["prompts"], result["predictions"]
    models_list = list(result["hidden"])
    distances = sorted({r["distance"] for r in result["accuracy"]})
    acc = {(r["model"], r["distance"]): r for r in result["accuracy"]}
    acc_rows = [[str(d)] + [f"{acc[(c, d)]['accuracy']:.2f}" for c in models_list] for d in distances]
    param_rows = [[esc(c.upper()), str(result["hidden"][c]), f"{result['parameters'][c]:,}",
                   f"{result['train_seconds'][c]:.0f} s"] for c in models_list]
    body = f"""
<p>The seed's claim: a vanilla RNN is a small whiteboard that keeps being overwritten, so by the time it must say
<em>French</em> it no longer knows it read <em>France</em>; an LSTM's gates let it keep the clue. Here every model was
trained from scratch on generated stories (<em>NAME lives in COUNTRY .</em>, filler sentences, <em>PRONOUN speaks
LANGUAGE .</em>) with the same number of parameters and training steps.</p>
<h2>1. The seed's prompt</h2>
<div class="prompt">{esc(prompts['seed'])}</div>
{_prediction_table(predictions['seed'], 'French')}
<h2>2. The same clue, far back</h2>
<div class="prompt">{esc(prompts['long'])}</div>
{_prediction_table(predictions['long'], 'French')}
<h2>3. Accuracy by distance</h2>
<p>Top-1 accuracy over the whole vocabulary at the word after <em>speaks</em>, on held-out stories.</p>
{inline_png(plot_png, 'accuracy by distance')}
{table(['distance (tokens)'] + [c.upper() for c in models_list], acc_rows)}
<h2>The models</h2>
{table(['model', 'hidden size', 'parameters', 'training time'], param_rows)}
<p class="note">Reproduce with <code>make demo</code>; compare more distances with <code>whiteboard compare</code>.</p>
{extra_sections}
"""
    atomic_write_text(Path(path), page("whiteboard demo: She speaks ... French?", body))
