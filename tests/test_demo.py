import json

from whiteboard.cli import main


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Alice lives in France. She is an artist. She likes to cook. She speaks" in printed  # as people type it
    assert "Memory horizon" in printed
    models = out / "models"
    assert f"whiteboard serve {models / 'rnn'} {models / 'lstm'} {models / 'gru'}" in printed  # the next command
    for cell in ("RNN", "LSTM"):
        assert f"{cell}  -> " in printed or f"{cell} -> " in printed
    result = json.loads((out / "results.json").read_text())
    assert set(result["predictions"]) == {"seed", "long"}
    assert len(result["predictions"]["seed"]["lstm"]) == 5
    assert len(result["prompts"]["long"].split()) - 3 >= 100
    html = (out / "summary.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert (out / "accuracy_by_distance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The trained models are ordinary run directories: predict works on them, and reads the
    # seed's sentence typed with ordinary punctuation word for word.
    capsys.readouterr()
    typed = "Alice lives in France. She is an artist. She likes to cook. She speaks"
    assert main(["predict", str(out / "models" / "lstm"), typed, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown"] == []
    assert set(result["horizons"]) == {"rnn", "lstm", "gru"} and set(result["learning_rates"]) == {"rnn", "lstm", "gru"}


def test_compare_writes_table_json_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "adding", "--models", "rnn,lstm", "--distances", "5,10", "--steps", "5",
                 "--hidden", "8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "adding: RMSE of the sum by distance" in printed and "same parameter count" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["model"], r["distance"]) for r in rows} == {("rnn", 5), ("rnn", 10), ("lstm", 5), ("lstm", 10)}
    assert (out / "results.csv").read_text().splitlines()[0].startswith("distance,model")
    assert (out / "plot.png").exists()


def test_compare_rejects_unknown_models(capsys):
    assert main(["compare", "--models", "rnn,transformer"]) == 2
    assert "--models takes names from" in capsys.readouterr().err
