"""The live whiteboard under load: `whiteboard serve` on the demo's three models, as a user runs it.

1. start-up: from starting `whiteboard serve` to the page's first byte (the issue's goal: the
   page within 10 s of the demo's end);
2. one client: 200-token texts one after another to /api/analyze (every model's predictions
   and every board); median and percentiles of the latency (goal: median <= 100 ms);
3. 50 concurrent clients, each sending its own 200-token texts; latency percentiles, the
   error count (goal: zero) and the requests answered per second.

The server is its own process (the only one running torch); this client sends HTTP only.

    make demo && python benchmarks/serve_load.py
    python benchmarks/serve_load.py --runs demo-out/models/rnn demo-out/models/lstm --clients 50 --requests 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

from whiteboard.experiments import tasks


def texts(count: int, tokens: int = 200) -> list[str]:
    """``count`` different texts of exactly ``tokens`` tokens, cut from held-out stories."""
    words = []
    for story in tasks.make_stories(count * tokens // 40 + 10, 20, 150, seed=5, split="test"):
        words.extend(story.tokens)
    return [" ".join(words[i * tokens : (i + 1) * tokens]) for i in range(count)]


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * pick(0.90), "p99_ms": 1000 * pick(0.99),
            "max_ms": 1000 * ordered[-1]}


def start_server(runs: list[str]) -> tuple[subprocess.Popen, str, float]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "whiteboard", "serve", *runs, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if " at " not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line}{process.stderr.read()}")
    url = line.split(" at ")[1].split()[0]
    urllib.request.urlopen(url, timeout=60).read()
    return process, url, time.perf_counter() - started


async def one_client(client: httpx.AsyncClient, url: str, bodies: list[str], latencies: list, errors: list) -> None:
    for text in bodies:
        started = time.perf_counter()
        try:
            response = await client.post(url + "api/analyze", json={"text": text, "top_k": 5})
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
            else:
                response.json()
        except httpx.HTTPError as exc:
            errors.append(repr(exc))
        latencies.append(time.perf_counter() - started)


async def load(url: str, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    corpus = texts(clients * requests)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one_client(client, url, corpus[i * requests : (i + 1) * requests], latencies, errors)
                               for i in range(clients)))
        elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "first_errors": errors[:3],
            "requests_per_s": len(latencies) / elapsed, **percentiles(latencies)}


def sequential(url: str, count: int) -> dict:
    latencies = []
    with httpx.Client(timeout=120) as client:
        for text in texts(count + 3)[:3]:  # warm-up
            client.post(url + "api/analyze", json={"text": text}).raise_for_status()
        for text in texts(count):
            started = time.perf_counter()
            response = client.post(url + "api/analyze", json={"text": text, "top_k": 5})
            response.raise_for_status()
            response.json()
            latencies.append(time.perf_counter() - started)
    return {"requests": count, **percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=[f"demo-out/models/{c}" for c in ("rnn", "lstm", "gru")])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--sequential", type=int, default=50, help="one client's requests")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        raise SystemExit(f"no run directory {', '.join(missing)} (run `make demo` first)")
    process, url, startup = start_server(args.runs)
    try:
        one = sequential(url, args.sequential)
        many = asyncio.run(load(url, args.clients, args.requests))
    finally:
        process.terminate()
        process.wait(30)
    result = {"startup_s": startup, "one_client": one, "concurrent": many}
    print(f"start-up to the page's first byte: {startup:.2f} s")
    print(f"one client, {one['requests']} texts of 200 tokens: median {one['median_ms']:.1f} ms, "
          f"p90 {one['p90_ms']:.1f} ms, p99 {one['p99_ms']:.1f} ms")
    print(f"{many['clients']} concurrent clients, {many['requests']} requests: median {many['median_ms']:.0f} ms, "
          f"p90 {many['p90_ms']:.0f} ms, p99 {many['p99_ms']:.0f} ms, max {many['max_ms']:.0f} ms, "
          f"{many['requests_per_s']:.1f} requests/s, errors {many['errors']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
