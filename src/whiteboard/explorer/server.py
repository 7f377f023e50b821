"""``whiteboard serve``: the live whiteboard as a local web app.

FastAPI on uvicorn: FastAPI checks every request body against a declared model (a bad one is
answered 422 with the field named), runs plain ``def`` endpoints on a thread pool so that a
model call never blocks the event loop, and comes with a test client; uvicorn is the ASGI
server it is built for. Both are small, pure Python, and widely kept.

Only the runs and corpora named on the command line are served, by name: no request carries
a path. The page and its script are files of this package, so it works offline.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from whiteboard.errors import WhiteboardError
from whiteboard.explorer import analysis, corpus as corpora
from whiteboard.explorer.analysis import MAX_FILLERS, MAX_TEXT_CHARS, MAX_TOP_K, ServedRun, TextTooLong

STATIC = Path(__file__).parent / "static"
#: A request body beyond this is refused before it is read (the longest text fits easily).
MAX_BODY_BYTES = 4 * MAX_TEXT_CHARS + 4096
#: Finished corpus jobs kept for the page to collect.
JOBS_KEPT = 50


class TextRequest(BaseModel):
    text: str
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)


class ReachRequest(BaseModel):
    text: str
    answer: str = ""


class DistanceRequest(BaseModel):
    clue: str = "Alice lives in France."
    question: str = "She speaks"
    answer: str = "French"
    fillers: int = Field(10, ge=0, le=MAX_FILLERS)


class SpanRequest(BaseModel):
    model: str
    text: str
    layer: int = 0
    field: str
    start: int
    end: int
    threshold: float = 0.3


class SelectRequest(BaseModel):
    corpus: str
    model: str
    layer: int = 0
    field: str
    pattern: str


class MatchRequest(BaseModel):
    corpus: str
    model: str
    layer: int = 0
    field: str
    units: list[int]
    threshold: float = 0.3


class Jobs:
    """Corpus scans, run on their own thread so that the page stays live while one runs;
    the page polls a job for its progress and then its result."""

    def __init__(self, workers: int = 1):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="whiteboard-scan")
        self.jobs: OrderedDict[str, dict] = OrderedDict()
        self.lock = threading.Lock()

    def submit(self, kind: str, work: Callable[[Callable[[float], None]], dict]) -> dict:
        job = {"id": uuid.uuid4().hex, "kind": kind, "status": "queued", "progress": 0.0, "result": None, "error": None}
        with self.lock:
            self.jobs[job["id"]] = job
            finished = [k for k, j in self.jobs.items() if j["status"] in ("done", "failed")]
            for key in finished[: max(0, len(self.jobs) - JOBS_KEPT)]:
                del self.jobs[key]

        def progress(fraction: float) -> None:
            job["progress"] = round(min(max(fraction, 0.0), 1.0), 4)

        def run() -> None:
            job["status"] = "running"
            try:
                job["result"] = work(progress)
                job["progress"], job["status"] = 1.0, "done"
            except WhiteboardError as exc:
                job["error"], job["status"] = str(exc), "failed"
            except Exception as exc:  # a bug: the page shows it instead of polling forever
                job["error"], job["status"] = f"internal error: {type(exc).__name__}: {exc}", "failed"

        self.executor.submit(run)
        return self.status(job["id"])

    def status(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id!r}")
            return dict(job)


def plain_json(data: dict) -> Response:
    """A response of plain data (str, float, int, None, lists and dicts) written by json.dumps.
    FastAPI would walk a returned dict with its jsonable_encoder first: for the boards of a
    200-token text that walk takes as long as the three models take to compute them."""
    return Response(json.dumps(data, separators=(",", ":")), media_type="application/json")


def create_app(runs: list[ServedRun], corpus_list: list[corpora.Corpus]) -> FastAPI:
    if not runs:
        raise WhiteboardError("name at least one run directory to serve")
    by_name = {run.name: run for run in runs}
    by_corpus = {c.name: c for c in corpus_list}
    jobs = Jobs()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        jobs.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="whiteboard: the live whiteboard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.jobs = jobs
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"the request is {int(length):,} bytes; the explorer reads at most "
                                           f"{MAX_BODY_BYTES:,} (texts up to {MAX_TEXT_CHARS:,} characters)"}, 413)
        return await call_next(request)

    @app.exception_handler(TextTooLong)
    async def too_long(_request, exc: TextTooLong):
        return JSONResponse({"detail": str(exc)}, 413)

    @app.exception_handler(WhiteboardError)
    async def bad_input(_request, exc: WhiteboardError):
        return JSONResponse({"detail": str(exc)}, 422)

    def model(name: str) -> ServedRun:
        if name not in by_name:
            raise HTTPException(404, f"no model {name!r}; served: {', '.join(by_name)}")
        return by_name[name]

    def corpus(name: str) -> corpora.Corpus:
        if name not in by_corpus:
            raise HTTPException(404, f"no corpus {name!r}; served: {', '.join(by_corpus) or 'none'}")
        return by_corpus[name]

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/models")
    def describe():
        from whiteboard.nn.trace import SEED_NAMES

        return {"models": [run.describe() for run in runs], "stories": analysis.demo_stories(),
                "corpora": list(by_corpus), "seed_names": SEED_NAMES,
                "limits": {"text_characters": MAX_TEXT_CHARS, "text_tokens": analysis.MAX_TEXT_TOKENS,
                           "fillers": MAX_FILLERS, "top_k": MAX_TOP_K},
                "distance": DistanceRequest().model_dump()}

    @app.post("/api/analyze")
    def analyze(request: TextRequest):
        return plain_json({"models": {run.name: analysis.analyze(run, request.text, request.top_k) for run in runs}})

    @app.post("/api/reach")
    def reach(request: ReachRequest):
        return plain_json({"models": {run.name: analysis.answer_reach(run, request.text, request.answer) for run in runs}})

    @app.post("/api/distance")
    def distance(request: DistanceRequest):
        fillers, lengths = analysis.distance_prompts(request.clue, request.question, request.fillers)
        return {"fillers": list(range(request.fillers + 1)), "filler_tokens": lengths, "answer": request.answer,
                "prompt": " ".join([request.clue] + [" ".join(s) for s in fillers] + [request.question]),
                "models": {run.name: analysis.distance_curve(run, request.clue, request.question, request.answer, fillers)
                           for run in runs}}

    @app.post("/api/select-span")
    def select_span(request: SpanRequest):
        run = model(request.model)
        corpora.check_choice(run, request.layer, request.field)
        values = analysis.trace_values(run, request.text, request.layer, request.field)
        return {"units": corpora.units_on_span(values, request.start, request.end, request.threshold)}

    @app.post("/api/corpus/select")
    def select(request: SelectRequest):
        run, chosen = model(request.model), corpus(request.corpus)
        corpora.check_choice(run, request.layer, request.field)
        return jobs.submit("select", lambda progress: corpora.select_units(
            run, chosen, request.layer, request.field, request.pattern, progress=progress))

    @app.post("/api/corpus/match")
    def match(request: MatchRequest):
        run, chosen = model(request.model), corpus(request.corpus)
        corpora.check_choice(run, request.layer, request.field)
        return jobs.submit("match", lambda progress: corpora.match_spans(
            run, chosen, request.layer, request.field, request.units, request.threshold, progress=progress))

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        return jobs.status(job_id)

    return app


def load_served(paths: list[Path], device: str = "cpu") -> list[ServedRun]:
    """Every run named, loaded before anything is served: a bad one stops the start-up with
    one message naming it."""
    from whiteboard.lm.checkpoint import load_run

    names = analysis.short_names(paths)
    served = []
    for name, path in zip(names, paths):
        model, vocab, _ = load_run(Path(path), device)
        served.append(analysis.serve_run(name, path, model, vocab))
    return served


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the URL is printed, so the URL printed is the one
    that answers (port 0 picks a free port)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as exc:
        raise WhiteboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def serve(runs: list[ServedRun], corpus_list: list[corpora.Corpus], host: str, port: int,
          announce: Callable[[str], None] = print) -> None:
    import uvicorn

    app = create_app(runs, corpus_list)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    announce(f"whiteboard: serving {', '.join(r.name for r in runs)} at http://{shown}:{bound_port}/ (Ctrl+C stops)")
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
