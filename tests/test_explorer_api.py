"""The explorer's API through FastAPI's test client: every number it sends is checked against
the same quantity computed another way (the model's own forward, inspect's trace, autograd
through the whole model, a brute-force scan), and bad requests get a status and a message."""

import threading

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from whiteboard.experiments import tasks  # noqa: E402
from whiteboard.explorer import analysis, corpus as corpora  # noqa: E402
from whiteboard.explorer.server import MAX_BODY_BYTES, create_app  # noqa: E402
from whiteboard.inspect.traces import correlated_units, pattern_signal, trace_text  # noqa: E402
from whiteboard.lm.generate import predict_next  # noqa: E402

from explorer_helpers import STORY_TEXT, served, story_corpus, unpack, write_runs  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return served(write_runs(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(runs, [story_corpus()])) as c:
        yield c


def _by_name(runs, name):
    return next(r for r in runs if r.name == name)


def test_models_lists_each_run_by_its_folder_name(client):
    info = client.get("/api/models").json()
    assert [(m["name"], m["mode"]) for m in info["models"]] == [("rnn", "RNN"), ("lstm", "LSTM"), ("gru", "GRU")]
    assert info["corpora"] == ["stories.txt"]
    assert info["stories"][0]["text"] == tasks.SEED_PROMPT_TYPED and info["stories"][0]["answer"] == "French"
    assert info["seed_names"]["forget_gate"] == "selective forget"


def test_analyze_matches_the_models_own_predictions_and_traces(client, runs):
    result = client.post("/api/analyze", json={"text": STORY_TEXT, "top_k": 3}).json()["models"]
    assert set(result) == {"rnn", "lstm", "gru"}
    for run in runs:
        got = result[run.name]
        tokens = run.vocab.tokenize(STORY_TEXT)
        assert [t["shown"] for t in got["tokens"]] == tokens
        # top-k after each prefix, as `whiteboard predict` computes it from scratch
        for i in (0, 3, len(tokens) - 1):
            expected = predict_next(run.model, run.vocab, " ".join(tokens[: i + 1]), 3)
            assert [p["token"] for p in got["predictions"][i]] == [p.token for p in expected]
            assert [p["probability"] for p in got["predictions"][i]] == pytest.approx(
                [p.probability for p in expected], abs=1e-5)
        # the probability given to each true next word
        ids = torch.tensor(run.vocab.encode(tokens)).unsqueeze(1)
        with torch.no_grad():
            probs = run.model(ids)[0][:, 0].softmax(-1)
        expected_next = [float(probs[t, ids[t + 1, 0]]) for t in range(len(tokens) - 1)]
        assert got["next_probability"][:-1] == pytest.approx(expected_next, abs=1e-5)
        assert got["next_probability"][-1] is None
        # every board, against inspect's trace of the same text
        reference = trace_text(run.model, run.vocab, STORY_TEXT)
        assert got["fields"] == list(reference.layers[0])
        for field, values in reference.layers[0].items():
            torch.testing.assert_close(unpack(got["layers"][0][field]), values.float(), rtol=0, atol=1e-6)


def test_unknown_words_are_shown_as_unk_not_refused(client):
    result = client.post("/api/analyze", json={"text": "Alice lives in Atlantis ."})
    assert result.status_code == 200
    token = result.json()["models"]["lstm"]["tokens"][3]
    assert token == {"typed": "Atlantis", "shown": "<unk>", "unknown": True}


@pytest.mark.parametrize("text, expected", [
    ("x " * (analysis.MAX_TEXT_TOKENS + 1), "tokens"),
    ("y" * (analysis.MAX_TEXT_CHARS + 1), "characters"),
])
def test_a_text_beyond_the_limit_is_413_with_a_message(client, text, expected):
    result = client.post("/api/analyze", json={"text": text})
    assert result.status_code == 413
    assert expected in result.json()["detail"] and "at most" in result.json()["detail"]


def test_a_body_beyond_the_limit_is_refused_before_it_is_read(client):
    result = client.post("/api/analyze", content=b"{" + b" " * MAX_BODY_BYTES + b"}",
                         headers={"content-type": "application/json"})
    assert result.status_code == 413 and "bytes" in result.json()["detail"]


def test_an_empty_text_and_a_bad_top_k_are_422(client):
    assert client.post("/api/analyze", json={"text": "   "}).json()["detail"].startswith("the text is empty")
    assert client.post("/api/analyze", json={"text": "Alice", "top_k": 0}).status_code == 422


def test_distance_curve_equals_reading_each_whole_prompt(client, runs):
    clue, question, answer, count = "Alice lives in France.", "She speaks", "French", 4
    result = client.post("/api/distance", json={"clue": clue, "question": question, "answer": answer,
                                                "fillers": count}).json()
    fillers = tasks.filler_sentences(count)
    assert result["fillers"] == list(range(count + 1))
    assert result["filler_tokens"] == [sum(len(s) for s in fillers[:n]) for n in range(count + 1)]
    assert result["prompt"] == " ".join([clue] + [" ".join(s) for s in fillers] + [question])
    for run in runs:
        expected = []
        for n in range(count + 1):
            prompt = " ".join([clue] + [" ".join(s) for s in fillers[:n]] + [question])
            probs = {p.token: p.probability for p in predict_next(run.model, run.vocab, prompt, len(run.vocab))}
            expected.append(probs[answer])
        assert result["models"][run.name]["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_distance_with_an_unknown_answer_says_so_per_model(client):
    result = client.post("/api/distance", json={"answer": "Klingon", "fillers": 1}).json()
    assert result["models"]["lstm"]["probabilities"] is None
    assert "does not know 'Klingon'" in result["models"]["lstm"]["note"]
    assert client.post("/api/distance", json={"fillers": analysis.MAX_FILLERS + 1}).status_code == 422


def test_reach_equals_autograd_through_the_whole_model(client, runs):
    result = client.post("/api/reach", json={"text": STORY_TEXT, "answer": "French"}).json()["models"]
    for run in runs:
        got = result[run.name]
        ids = torch.tensor(run.vocab.encode(run.vocab.tokenize(STORY_TEXT))).unsqueeze(1)
        kept = {}

        def keep(_module, _inputs, output):
            output.retain_grad()
            kept["embedded"] = output

        hook = run.model.embedding_dropout.register_forward_hook(keep)  # its output is the embedded text
        try:
            logits, _ = run.model(ids)  # the whole model's forward, not the endpoint's route through it
            loss = torch.nn.functional.cross_entropy(logits[-1], torch.tensor([run.vocab.index["French"]]))
            loss.backward()
        finally:
            hook.remove()
            run.model.zero_grad(set_to_none=True)
        out = kept["embedded"]
        norms = out.grad[:, 0].norm(dim=-1)
        assert got["target"] == "French"
        assert got["norms"] == pytest.approx(norms.tolist(), rel=1e-4, abs=1e-9)
        assert sum(got["shares"]) == pytest.approx(1.0)
        assert got["target_probability"] == pytest.approx(float((-loss.detach()).exp()), abs=1e-5)


def test_reach_without_a_known_answer_follows_the_top_guess(client, runs):
    got = client.post("/api/reach", json={"text": STORY_TEXT, "answer": "Klingon"}).json()["models"]["gru"]
    top = predict_next(_by_name(runs, "gru").model, _by_name(runs, "gru").vocab, STORY_TEXT, 1)[0]
    assert got["target"] == top.token and got["answer_known"] is False


def test_units_on_span_is_lstmvis_selection():
    values = torch.tensor([[0.0, 0.9, 0.5, 0.9],
                           [0.8, 0.9, 0.5, 0.1],
                           [0.7, 0.6, 0.4, 0.9],
                           [0.1, 0.1, 0.1, 0.1]])
    # on at tokens 1..2: units 0 and 1 (unit 1 was already on before the span, so not it)
    assert [u["unit"] for u in corpora.units_on_span(values, 1, 2, 0.5)] == [0]
    assert [u["unit"] for u in corpora.units_on_span(values, 0, 0, 0.5)] == [1, 3, 2]
    with pytest.raises(Exception, match="not within"):
        corpora.units_on_span(values, 2, 4, 0.5)


def test_select_span_endpoint_uses_the_texts_trace(client, runs):
    run = _by_name(runs, "lstm")
    values = trace_text(run.model, run.vocab, STORY_TEXT).layers[0]["cell"]
    result = client.post("/api/select-span", json={"model": "lstm", "text": STORY_TEXT, "field": "cell",
                                                   "start": 2, "end": 4, "threshold": 0.0}).json()
    assert result["units"] == corpora.units_on_span(values, 2, 4, 0.0)


def _wait(client, job):
    while job["status"] in ("queued", "running"):
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 tokens, so every scan carries its state across many chunk boundaries."""
    monkeypatch.setattr(corpora, "CHUNK", 7)


def _whole_corpus_trace(run, corpus, field):
    tokens = corpus.tokens(run)
    ids = torch.tensor(run.vocab.encode(tokens)).unsqueeze(1)
    with torch.no_grad():
        _, _, trace = run.model.trace(ids)
    return tokens, trace.steps[0][0][field][:, 0]


def test_corpus_select_equals_correlation_over_the_whole_trace(client, runs, small_chunks):
    job = client.post("/api/corpus/select", json={"corpus": "stories.txt", "model": "lstm", "field": "hidden",
                                                  "pattern": "regex:^(speaks|lives)$"}).json()
    job = _wait(client, job)
    assert job["status"] == "done" and job["progress"] == 1.0
    tokens, values = _whole_corpus_trace(_by_name(runs, "lstm"), story_corpus(), "hidden")
    expected = correlated_units(values.double(), pattern_signal(tokens, "regex:^(speaks|lives)$", "word").double(), 6)
    got = job["result"]["units"][:6]
    assert [u["unit"] for u in got] == [u for u, _ in expected]
    assert [u["r"] for u in got] == pytest.approx([r for _, r in expected], abs=1e-4)


def test_corpus_match_equals_a_brute_force_scan(client, runs, small_chunks):
    units = [0, 2]
    tokens, values = _whole_corpus_trace(_by_name(runs, "gru"), story_corpus(), "hidden")
    threshold = float(values[:, units].min(1).values.median())  # both units on at about half the tokens
    job = _wait(client, client.post("/api/corpus/match", json={
        "corpus": "stories.txt", "model": "gru", "field": "hidden", "units": units, "threshold": threshold}).json())
    result = job["result"]
    on = [all(float(values[t, u]) >= threshold for u in units) for t in range(len(tokens))]
    spans, start = [], None
    for t, flag in enumerate(on + [False]):
        if flag and start is None:
            start = t
        elif not flag and start is not None:
            spans.append((start, t))
            start = None
    assert result["span_count"] == len(spans) and result["tokens"] == len(tokens)
    longest = max(e - s for s, e in spans)
    assert result["spans"][0]["length"] == longest
    first = result["spans"][0]
    assert first["inside"] == tokens[first["start"] : first["end"] + 1]
    assert (first["start"], first["end"] + 1) in spans
    assert result["on_share"] == pytest.approx(sum(on) / len(on))


def test_requests_reach_only_what_was_named(client):
    assert client.post("/api/corpus/select", json={"corpus": "/etc/passwd", "model": "lstm", "field": "cell",
                                                   "pattern": "regex:a"}).status_code == 404
    assert client.post("/api/corpus/match", json={"corpus": "stories.txt", "model": "../lstm", "field": "cell",
                                                  "units": [0]}).status_code == 404
    assert client.get("/api/jobs/nope").status_code == 404
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py"):
        assert client.get(path).status_code == 404
    assert client.get("/static/app.js").status_code == 200


def test_bad_choices_are_422_with_the_reason(client):
    detail = client.post("/api/corpus/select", json={"corpus": "stories.txt", "model": "rnn", "field": "cell",
                                                     "pattern": "regex:a"}).json()["detail"]
    assert "RNN" in detail and "not 'cell'" in detail
    detail = client.post("/api/corpus/select", json={"corpus": "stories.txt", "model": "lstm", "layer": 3,
                                                     "field": "cell", "pattern": "regex:a"}).json()["detail"]
    assert "1 layer(s)" in detail


def test_a_failing_scan_reports_its_message(client):
    job = _wait(client, client.post("/api/corpus/select", json={
        "corpus": "stories.txt", "model": "lstm", "field": "cell", "pattern": "regex:("}).json())
    assert job["status"] == "failed" and "not a regular expression" in job["error"]


def test_a_long_scan_does_not_hold_up_other_requests(client, monkeypatch):
    """A scan runs on its own thread: while it is held mid-corpus, the page's other requests
    are answered."""
    release, started = threading.Event(), threading.Event()
    real_stream = corpora.stream_states

    def held(*args, **kwargs):
        for item in real_stream(*args, **kwargs):
            started.set()
            assert release.wait(30)
            yield item

    monkeypatch.setattr(corpora, "stream_states", held)
    job = client.post("/api/corpus/select", json={"corpus": "stories.txt", "model": "lstm", "field": "cell",
                                                  "pattern": "regex:^speaks$"}).json()
    assert started.wait(30)
    try:
        assert client.post("/api/analyze", json={"text": STORY_TEXT}).status_code == 200
        assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "running"
    finally:
        release.set()
    assert _wait(client, job)["status"] == "done"


def test_concurrent_requests_all_answer_the_same(client):
    from concurrent.futures import ThreadPoolExecutor

    first = client.post("/api/analyze", json={"text": STORY_TEXT}).json()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.post("/api/analyze", json={"text": STORY_TEXT}).json(), range(16)))
    assert all(r == first for r in results)


def test_short_names_add_parents_only_where_needed(tmp_path):
    a, b = tmp_path / "x" / "lstm", tmp_path / "y" / "lstm"
    assert analysis.short_names([a, b, tmp_path / "rnn"]) == ["x/lstm", "y/lstm", "rnn"]
    with pytest.raises(Exception, match="named twice"):
        analysis.short_names([a, a])


def test_pack_round_trips(runs):
    values = torch.randn(3, 5)
    torch.testing.assert_close(unpack(analysis.pack(values)), values)


def test_a_character_model_is_served_beside_word_models(tmp_path, runs):
    from whiteboard.lm import config as cfg
    from whiteboard.lm.checkpoint import save_model, save_run_files
    from whiteboard.lm.model import LanguageModel
    from whiteboard.lm.vocab import Vocabulary

    vocab = Vocabulary.build("abc de\n", "char")
    config = cfg.resolve(sets=["model.embedding_size=4", "model.hidden_size=5", "model.num_layers=1"])
    model = LanguageModel(len(vocab), config.model)
    save_run_files(tmp_path / "chars", config, vocab)
    save_model(tmp_path / "chars", model, 0)
    (char_run,) = served([tmp_path / "chars"])
    with TestClient(create_app([*runs, char_run], [])) as client:
        got = client.post("/api/analyze", json={"text": "a bz"}).json()["models"]
        assert [t["shown"] for t in got["chars"]["tokens"]] == ["a", " ", "b", "<unk>"]
        assert len(got["lstm"]["tokens"]) == 2  # the word models read two words
        curve = client.post("/api/distance", json={"fillers": 1}).json()["models"]
        assert curve["chars"]["probabilities"] is None and curve["lstm"]["probabilities"] is not None
        assert client.get("/api/models").json()["corpora"] == []
