"""Load on `reslab serve` over loopback: requests/s and latency at 1, 8 and 32 clients.

    .venv/bin/python benchmarks/serve_load.py [--checkpoint RUN_OR_CKPT] [--seconds 8]

Starts ``python -m reslab serve`` on a free port twice, with the inference fast path on and
off, and runs each level of concurrency against ``POST /predict`` with a real Fashion-MNIST
test image sent as the page sends it (multipart form). Each client is a keep-alive HTTP/1.1
connection that sends its next request when the answer to the last one arrives (a closed
loop), all in one asyncio process, so the load generator costs little beside the server.

Where the time goes: the server reports the seconds it spent reading each upload (the body
and its multipart form), and decoding and in the model per batch (``GET /stats``); the rest
of each request's share of the machine is HTTP parsing, JSON, the event loop, the hand-offs
to the batch thread and the load generator. ``GET /health`` at the
same concurrency measures bare HTTP. Without --checkpoint, a default model is trained for one
epoch in a temporary folder first. Writes benchmarks/results/serve_load-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from reslab.bench import machine_info
from reslab.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
BOUNDARY = "reslabloadboundary"


def test_png(index: int = 0) -> bytes:
    """One Fashion-MNIST test image as a PNG file's bytes (a random one without the set)."""
    if TEST_IMAGES.is_file():
        pixels = np.frombuffer(gzip.open(TEST_IMAGES).read(), np.uint8, 784, 16 + 784 * index)
    else:
        pixels = np.random.default_rng(index).integers(0, 256, 784, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28)).save(out, "PNG")
    return out.getvalue()


def request_bytes(method: str, path: str, png: bytes | None) -> bytes:
    if png is None:
        return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(port: int, request: bytes, stop: float, latencies: list, failures: list):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(status)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
        failures.append(type(error).__name__)
    finally:
        writer.close()


async def _load(port: int, request: bytes, clients: int, seconds: float) -> dict:
    latencies, failures = [], []
    warm_stop = time.perf_counter() + min(1.0, seconds / 4)
    await asyncio.gather(*(_client(port, request, warm_stop, [], []) for _ in range(clients)))
    started = time.perf_counter()
    stop = started + seconds
    await asyncio.gather(
        *(_client(port, request, stop, latencies, failures) for _ in range(clients))
    )
    wall = time.perf_counter() - started
    ms = sorted(1000 * x for x in latencies)
    return {
        "clients": clients,
        "requests": len(ms),
        "failed": len(failures),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(ms) / wall, 1),
        "p50_ms": round(statistics.median(ms), 2) if ms else None,
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2) if ms else None,
    }


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def start_server(checkpoint: str, fast: bool, max_batch: int, max_wait_ms: float, threads: int = 0):
    command = [sys.executable, "-m", "reslab", "serve", checkpoint, "--port", "0"]
    command += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    command += ["--threads", str(threads)]
    command += [] if fast else ["--no-fast"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # "serving NAME at http://127.0.0.1:PORT/ (...)"
    if "http://" not in line:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
    get_json(port, "/health")
    return server, port


def share(before: dict, after: dict, result: dict) -> dict:
    """Per request: server decode and model milliseconds, mean batch size, and the rest of
    the request's share of the cores (cores / requests per second)."""
    count = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    if not count:
        return {}
    per = {
        f"{stage}_ms": round(
            1000 * (after["seconds"][stage] - before["seconds"].get(stage, 0)) / count, 3
        )
        for stage in after["seconds"]
    }
    budget = 1000 * (os.cpu_count() or 1) / max(result["requests_per_s"], 1e-9)
    per["core_ms_per_request"] = round(budget, 3)
    per["rest_ms"] = round(budget - sum(v for k, v in per.items() if k != "core_ms_per_request"), 3)
    per["mean_batch"] = round(count / batches, 2) if batches else None
    return per


def measure(checkpoint: str, fast: bool, threads: int, args, png: bytes) -> list[dict]:
    server, port = start_server(checkpoint, fast, args.max_batch, args.max_wait_ms, threads)
    rows = []
    try:
        predict, health = (
            request_bytes("POST", "/predict", png),
            request_bytes("GET", "/health", None),
        )
        for clients in args.clients:
            before = get_json(port, "/stats")
            result = asyncio.run(_load(port, predict, clients, args.seconds))
            result.update(share(before, get_json(port, "/stats"), result))
            result["fast"], result["threads"] = fast, threads
            rows.append(result)
            print(
                f"  fast={fast} threads={threads} clients={clients}: {result['requests_per_s']} req/s, "
                f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, failed {result['failed']}",
                flush=True,
            )
        if fast and threads == args.threads[0]:
            bare = asyncio.run(_load(port, health, max(args.clients), args.seconds / 2))
            rows.append({**bare, "fast": fast, "route": "GET /health"})
            print(f"  GET /health at {bare['clients']} clients: {bare['requests_per_s']} req/s")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def default_checkpoint(folder: str) -> str:
    """A default Fashion-MNIST model trained for one epoch (about a minute on 2 cores)."""
    run = Path(folder) / "run"
    subprocess.run(
        [sys.executable, "-m", "reslab", "train", "--epochs", "1", "--out", str(run)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(run)


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'fast':>5} {'thr':>3} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} "
        f"{'batch':>6} {'upload':>7} {'decode':>7} {'model':>7} {'rest':>7}  (ms per request)"
    )
    for r in rows:
        if r.get("route"):
            continue
        print(
            f"{'on' if r['fast'] else 'off':>5} {r['threads'] or 'def':>3} {r['clients']:>7} {r['requests_per_s']:>8} "
            f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['failed']:>6} {r.get('mean_batch', '-'):>6} "
            f"{r.get('upload_ms', '-'):>7} {r.get('decode_ms', '-'):>7} {r.get('model_ms', '-'):>7} {r.get('rest_ms', '-'):>7}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a run folder or .pt (default: train one epoch)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per level (default 8)")
    parser.add_argument("--clients", default="1,8,32", help="levels (default 1,8,32)")
    parser.add_argument("--max-batch", type=int, default=32, help="server's (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="server's (default 2)")
    parser.add_argument(
        "--threads", default="0", help="server's torch threads, each in turn (default 0: torch's)"
    )
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    info = machine_info()
    png = test_png()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or default_checkpoint(folder)
        payload = load_checkpoint(checkpoint)
        model = {
            "name": payload["model"]["name"],
            "kwargs": payload["model"]["kwargs"],
            "preset": payload["config"].get("preset"),
            "epochs": payload["config"].get("epochs"),
            "tta": payload["config"].get("tta"),
            "test_accuracy": payload.get("test_accuracy"),
        }
        started = time.perf_counter()
        rows = [
            row
            for threads in args.threads
            for fast in (True, False)
            for row in measure(checkpoint, fast, threads, args, png)
        ]
        wall = time.perf_counter() - started
    print_table(rows)
    at = {(r["fast"], r["threads"], r["clients"]): r for r in rows if not r.get("route")}
    top = max(args.clients)
    ratios = {}
    for threads in args.threads:
        on, off = at[True, threads, top], at[False, threads, top]
        ratios[threads] = round(on["requests_per_s"] / off["requests_per_s"], 3)
        print(f"threads {threads}: fast path on/off at {top} clients: {ratios[threads]:.2f}x req/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "machine": info,
        "checkpoint": args.checkpoint or "trained for one epoch by this script",
        "model": model,
        "image": "Fashion-MNIST test image 0, PNG, multipart form",
        "seconds_per_level": args.seconds,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "results": rows,
        "fast_over_plain_at_most_clients": {str(t): r for t, r in ratios.items()},
        "wall_seconds": round(wall, 1),
        "load_average_start": info["load_average_start"],
        "load_average_end": os.getloadavg(),
        "note": "server and load generator share the machine's cores with other work",
        "threads": "the server's torch threads; 0 = torch's default (one per core)",
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
