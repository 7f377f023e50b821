"""Self-contained HTML pages: every style, script and image is inlined, so a report opens
from ``file://`` with no network and can be mailed as one file."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from whiteboard.files import atomic_write_text

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
trained from scratch on generated stories (<em>NAME lives in COUNTRY.</em>, filler sentences, <em>PRONOUN speaks
LANGUAGE.</em>) with the same number of parameters and training steps, each at its own best learning rate and with
the initialisation its literature recommends (the RNN: ReLU with an identity recurrence, Le et al. 2015). The claim is
about distance: the question is how far back each model can still read the clue.</p>
<h2>1. The seed's prompt</h2>
<div class="prompt">{esc(prompts['seed'])}</div>
{_prediction_table(predictions['seed'], 'French')}
<h2>2. The same clue, far back</h2>
<div class="prompt">{esc(prompts['long'])}</div>
{_prediction_table(predictions['long'], 'French')}
<h2>3. Accuracy by distance</h2>
<p>Top-1 accuracy over the whole vocabulary at the word after <em>speaks</em>, on held-out stories; the models were
trained on lags up to {result['settings']['max_distance']}
tokens. Memory horizon, the distance where accuracy falls to half its value at 10 tokens or less:
{', '.join(f"{esc(c.upper())} {esc(h)}" for c, h in result.get('horizons', {}).items())}.</p>
{inline_png(plot_png, 'accuracy by distance')}
{table(['distance (tokens)'] + [c.upper() for c in models_list], acc_rows)}
<h2>The models</h2>
{table(['model', 'hidden size', 'parameters', 'training time'], param_rows)}
<p class="note">Reproduce with <code>make demo</code>; compare more distances with <code>whiteboard compare</code>.</p>
{extra_sections}
"""
    atomic_write_text(Path(path), page("whiteboard demo: She speaks ... French?", body))


# --------------------------------------------------------------------------- inspect

# The page's script draws every heatmap from the embedded JSON, so the numbers shown are
# exactly the traced ones; it records how many cells it drew and any error on <body> so
# a headless browser test can check the rendering.
HEATMAP_SCRIPT = r"""
(function () {
  const errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); document.body.dataset.errors = errors.length; });
  const data = JSON.parse(document.getElementById("trace-data").textContent);
  function gateColor(v) {           // 0 white .. 1 dark blue
    const x = Math.max(0, Math.min(1, v));
    return "rgb(" + Math.round(255 - 215 * x) + "," + Math.round(255 - 170 * x) + "," + Math.round(255 - 60 * x) + ")";
  }
  function stateColor(v, scale) {   // negative red .. 0 white .. positive blue
    const x = Math.max(-1, Math.min(1, v / (scale || 1)));
    if (x >= 0) return "rgb(" + Math.round(255 - 200 * x) + "," + Math.round(255 - 140 * x) + ",255)";
    return "rgb(255," + Math.round(255 + 160 * x) + "," + Math.round(255 + 180 * x) + ")";
  }
  function colorFor(map, v) { return map.range === "gate" ? gateColor(v) : stateColor(v, map.scale); }
  let cells = 0;
  for (const map of data.heatmaps) {
    const host = document.getElementById(map.id);
    const grid = document.createElement("div");
    grid.className = "hm-grid";
    grid.style.gridTemplateColumns = "5em repeat(" + data.tokens.length + ", 14px)";
    grid.appendChild(document.createElement("div"));
    data.tokens.forEach(function (tok) {
      const label = document.createElement("div");
      label.className = "hm-token";
      label.textContent = tok === "\n" ? "\u21b5" : tok;
      grid.appendChild(label);
    });
    map.units.forEach(function (unit, row) {
      const name = document.createElement("div");
      name.className = "hm-unit";
      name.textContent = "unit " + unit;
      grid.appendChild(name);
      map.values[row].forEach(function (v, t) {
        const cell = document.createElement("div");
        cell.className = "hm-cell";
        cell.style.background = colorFor(map, v);
        cell.title = map.title + " | unit " + unit + " | token " + t + " '" + data.tokens[t] + "' | " + v.toFixed(3);
        grid.appendChild(cell);
        cells += 1;
      });
    });
    host.appendChild(grid);
  }
  const select = document.getElementById("unit-select");
  const textView = document.getElementById("unit-text");
  function showUnit(index) {
    const view = data.unit_views[index];
    textView.innerHTML = "";
    data.tokens.forEach(function (tok, t) {
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = tok === "\n" ? "\u21b5\n" : tok;
      span.style.background = stateColor(view.values[t], view.scale);
      span.title = view.label + ": " + view.values[t].toFixed(3);
      textView.appendChild(span);
      if (data.level === "word") textView.appendChild(document.createTextNode(" "));
    });
  }
  if (select && data.unit_views.length) {
    data.unit_views.forEach(function (view, i) {
      const option = document.createElement("option");
      option.value = i;
      option.textContent = view.label;
      select.appendChild(option);
    });
    select.addEventListener("change", function () { showUnit(Number(select.value)); });
    showUnit(0);
  }
  document.body.dataset.heatmapCells = cells;
  document.body.dataset.errors = errors.length;
  document.body.dataset.rendered = "yes";
})();
"""

HEATMAP_STYLE = """
.hm-grid { display: grid; gap: 1px; overflow-x: auto; font-size: 10px; margin: .4em 0 1.2em; padding-bottom: .3em; }
.hm-token { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; height: 5.5em;
            overflow: hidden; font-family: ui-monospace, monospace; }
.hm-unit { white-space: nowrap; color: #555; } .hm-cell { height: 14px; }
.tokens .tok, #unit-text .tok { font-family: ui-monospace, monospace; padding: 1px 2px; border-radius: 3px; }
.tokens .tok { background: #eef; margin: 1px; display: inline-block; } #unit-text { white-space: pre-wrap; line-height: 1.9; }
"""


def inspect_report(path: Path, text_trace, units: list[list[int]], saturation_stats: list[dict], unit_views: list[dict],
                   correlations: list[dict] | None, images: dict[str, bytes], title: str, level: str,
                   seed_names: dict[str, str], fields: tuple[str, ...]) -> dict:
    """Write the inspection page (a heatmap per traced name in ``fields``); returns the
    embedded data (for tests)."""
    heatmaps, sections = [], []
    for layer_index, layer in enumerate(text_trace.layers):
        for name in fields:
            values = layer[name][:, units[layer_index]].t()  # (units, T)
            gate_like = name.endswith("_gate")
            scale = 1.0 if gate_like or name in ("hidden", "candidate") else max(float(values.abs().max()), 1e-6)
            hm_id = f"hm-{layer_index}-{name}"
            words = seed_names.get(name)
            label = name.replace("_", " ") + (f" ({words})" if words else "")
            heatmaps.append({"id": hm_id, "title": f"layer {layer_index} {label}", "units": units[layer_index],
                             "values": [[round(float(v), 4) for v in row] for row in values],
                             "range": "gate" if gate_like else "state", "scale": scale})
            sections.append(f"<h3>Layer {layer_index}: {esc(label)}</h3><div id=\"{hm_id}\"></div>")
    data = {"tokens": text_trace.tokens, "level": level, "heatmaps": heatmaps, "unit_views": unit_views}
    token_chips = "".join(
        f'<span class="tok" title="{esc(" | ".join(f"{p.token} {p.probability:.2f}" for p in preds))}">{esc(tok)}</span> '
        for tok, preds in zip(text_trace.tokens, text_trace.predictions))
    prediction_rows = [[str(t), esc(tok)] + [f"{esc(p.token)} {p.probability:.2f}" for p in preds]
                       for t, (tok, preds) in enumerate(zip(text_trace.tokens, text_trace.predictions))]
    k = len(text_trace.predictions[0]) if text_trace.predictions else 0
    sat_rows = [[str(i), esc(gate.replace("_", " ")), f"{v['below']:.1%}", f"{v['above']:.1%}"]
                for i, layer in enumerate(saturation_stats) for gate, v in layer.items()]
    corr_html = ""
    if correlations:
        corr_html = "<p>Units whose activation follows the pattern best (Pearson r):</p>" + table(
            ["layer", "unit", "quantity", "r"], [[str(c["layer"]), str(c["unit"]), esc(c["field"]), f"{c['r']:+.3f}"] for c in correlations])
    unknown = (f"<p class=\"note\">Not in the vocabulary, read as &lt;unk&gt;: {esc(', '.join(text_trace.unknown))}</p>"
               if text_trace.unknown else "")
    image_html = "".join(f"<h3>{esc(name)}</h3>{inline_png(png, name)}" for name, png in images.items())
    sat_table = table(["layer", "gate", "share < 0.1 (shut)", "share > 0.9 (open)"], sat_rows) if sat_rows else \
        "<p>A vanilla RNN has no gates: it overwrites its whole board at every step.</p>"
    body = f"""
<p class="note">How to read this page: every column of a heatmap is one token of the text, every row one unit of the
network's memory. For an LSTM, the <b>input gate</b> decides how much new information is written onto the board
(selective read), the <b>forget gate</b> how much of the board is kept (1 = keep, 0 = erase: selective forget), the
<b>output gate</b> how much of the board is shown to the next step (selective write), and the <b>cell state</b> is the
board itself. Gates run from white (0, shut) to dark blue (1, open); states from red (negative) through white to blue
(positive). Hover over any cell for its value.</p>
<h2>The text and the model's predictions</h2>
{unknown}
<div class="tokens">{token_chips}</div>
<details><summary>Top predictions after every token</summary>
{table(['position', 'token'] + [f'#{i + 1}' for i in range(k)], prediction_rows)}</details>
<h2>Gates and states, token by token</h2>
<p>Units shown: {'; '.join(f'layer {i}: {u}' for i, u in enumerate(units))}.</p>
{''.join(sections)}
<h2>Gate saturation</h2>
<p>How often each gate is nearly shut or wide open over this text (Karpathy, Johnson &amp; Fei-Fei 2015).</p>
{sat_table}
<h2>One unit over the text</h2>
{corr_html}
<p><label>Unit: <select id="unit-select"></select></label></p>
<div id="unit-text"></div>
{image_html}
<script type="application/json" id="trace-data">{_json_for_script(data)}</script>
"""
    html_text = page(title, body, HEATMAP_SCRIPT).replace("</style>", HEATMAP_STYLE + "</style>", 1)
    atomic_write_text(Path(path), html_text)
    return data


def _json_for_script(data) -> str:
    import json

    # Inside <script> the HTML parser ends the element at "</script" and reads "<!--" as the
    # start of an escaped comment: any "<" (and ">", "&") of the user's text is written as
    # its JSON escape, which the page's JSON.parse reads back unchanged.
    text = json.dumps(data)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
