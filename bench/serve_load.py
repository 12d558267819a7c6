"""Load test of ``python -m videollm.serve``: N concurrent clients on loopback vs the same N one by one.

    python bench/serve_load.py                  # tiny model, 16 clients, a clip each, 256 new tokens each
    python bench/serve_load.py --media none     # text only: the generation alone
    python bench/serve_load.py --clients 16 --max-tokens 128 --cfg-path eval_configs/tiny.yaml

What it does, in one run, side by side:

1. writes N synthetic clips (``videollm.synthetic.write_clip``, 64x64, 2 s) into a temporary
   media root and starts the server as a subprocess on 127.0.0.1 (batching on, max batch N; the
   model built with ``--seed``, so both servers below hold the same random weights);
2. warms it up, then sends the N requests (one clip each, a question, greedy, ``max_tokens``)
   **one after another**, then the same N **concurrently** (N threads released together);
3. starts a second server with ``--max-batch-size 1`` and sends the N concurrently again: the
   same concurrency without batching, to show what the batching itself buys;
4. prints wall time, throughput (requests/s and completion tokens/s), p50/p95 latency, the
   batch sizes the server formed (``/health``), lost requests (any that did not come back as a
   200 with an answer) and whether the concurrent answers equal the one-by-one answers (greedy
   decoding: they must). Exit status 1 if a request was lost or the servers failed, else 0.

Both servers are stopped at the end (also on Ctrl-C). Each server takes about 10-15 s to start
on a 2-core CPU (importing torch and building the model).

Reading the figures: batching shares each generation step among the rows, so it pays when a
step's fixed cost (Python, kernel launches, the stop check) dominates its arithmetic, as with
the tiny model on a CPU; it does nothing for media decoding, which every request pays (each clip
is decoded in a child process, see ``videollm.processors.video_loader.run_isolated``). The
server-side lines split the time into generation and decoding, so a run whose decoding dominates
(a loaded machine, short answers) shows why its speed-up is small; ``--media none`` measures the
generation alone. Results from this 2-core machine are in docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m videollm.serve`` in a subprocess, stopped on exit."""

    def __init__(self, cfg_path: str, media_root: str, extra: Sequence[str], log: Path, threads: int,
                 seed: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "videollm.serve", "--cfg-path", cfg_path, "--port", str(self.port),
               "--media-root", media_root, "--served-model-name", "bench", "--log-level", "warning", "--seed", str(seed), *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start in {timeout:.0f} s; see {self.log.name}")

    def health(self) -> Dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=5.0).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def request_body(clip: Optional[Path], question: str, max_tokens: int) -> Dict:
    parts = [{"type": "video_url", "video_url": {"url": clip.resolve().as_uri()}}] if clip is not None else []
    return {"model": "bench", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]}


def send(client, body: Dict) -> Tuple[float, Optional[str], int, str]:
    """-> (latency s, answer or None, completion tokens, error text)."""
    t0 = time.perf_counter()
    try:
        r = client.post("/v1/chat/completions", json=body)
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            return latency, None, 0, f"HTTP {r.status_code}: {r.text[:200]}"
        out = r.json()
        return latency, out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"], ""
    except Exception as exc:  # noqa: BLE001 - a lost request is a result here
        return time.perf_counter() - t0, None, 0, f"{type(exc).__name__}: {exc}"


def sequential(url: str, bodies: List[Dict], timeout: float):
    import httpx

    results = []
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for body in bodies:
            results.append(send(client, body))
    return time.perf_counter() - t0, results


def concurrent(url: str, bodies: List[Dict], timeout: float):
    import httpx

    results: List = [None] * len(bodies)
    clients = [httpx.Client(base_url=url, timeout=timeout) for _ in bodies]
    barrier = threading.Barrier(len(bodies) + 1)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = send(clients[i], bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout + 5)
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return wall, [r if r is not None else (timeout, None, 0, "no reply (thread still running)") for r in results]


def percentile(values: Sequence[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(name: str, wall: float, results) -> Dict:
    ok = [r for r in results if r[1] is not None]
    lat = [r[0] for r in ok]
    tokens = sum(r[2] for r in ok)
    return {"mode": name, "wall_s": wall, "ok": len(ok), "lost": len(results) - len(ok),
            "req_per_s": len(ok) / wall if wall > 0 else 0.0, "tok_per_s": tokens / wall if wall > 0 else 0.0,
            "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95), "tokens": tokens,
            "errors": [r[3] for r in results if r[1] is None][:3]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg-path", default="eval_configs/tiny.yaml")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each server (OMP_NUM_THREADS; 1 suits a shared 2-core machine)")
    parser.add_argument("--media", choices=["video", "none"], default="video",
                        help="each request asks about its own clip (default), or text only (generation alone)")
    parser.add_argument("--seed", type=int, default=0, help="both servers build the same (random-weight) model")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch-size 1 server")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    from videollm.synthetic import COLORS, DIRECTIONS, SHAPES, ClipSpec, write_clip

    n = args.clients
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    clips = []
    colors = list(COLORS)
    for i in range(n):
        spec = ClipSpec(name=f"clip{i}", shape=SHAPES[i % len(SHAPES)], color=colors[i % len(colors)],
                        direction=DIRECTIONS[i % len(DIRECTIONS)], speed="slow", seed=i)
        write_clip(tmp / f"clip{i}.mp4", spec)
        clips.append(tmp / f"clip{i}.mp4")
    questions = ["What is moving in the video?", "Which direction is the shape moving?",
                 "What colour is the shape?", "Describe the video."]
    bodies = [request_body(clips[i] if args.media == "video" else None, questions[i % len(questions)],
                           args.max_tokens) for i in range(n)]

    rows: List[Dict] = []
    lost = 0
    servers: List[Server] = []
    try:
        print(f"starting the server ({args.cfg_path}, max batch {n}) ...", flush=True)
        batched = Server(args.cfg_path, str(tmp), ["--max-batch-size", str(n), "--batch-wait-ms",
                                                   str(args.batch_wait_ms)], tmp / "server_batched.log", args.threads,
                         args.seed)
        servers.append(batched)
        unbatched = None
        if not args.no_unbatched:  # started now: its start-up overlaps nothing measured below
            unbatched = Server(args.cfg_path, str(tmp), ["--max-batch-size", "1"], tmp / "server_unbatched.log",
                               args.threads, args.seed)
            servers.append(unbatched)
        batched.wait_ready()
        if unbatched is not None:
            unbatched.wait_ready()
        for s in servers:  # warm-up: first decode, first generate
            sequential(s.url, bodies[:2], args.timeout)
            concurrent(s.url, bodies[:4], args.timeout)
        before = batched.health()
        wall, seq = sequential(batched.url, bodies, args.timeout)
        rows.append(summary(f"{n} one after another", wall, seq))
        mid = batched.health()
        wall, conc = concurrent(batched.url, bodies, args.timeout)
        after = batched.health()
        rows.append(summary(f"{n} concurrent, batched", wall, conc))
        batches = after["batches"] - mid["batches"]
        rows[-1]["batches"] = batches
        rows[-1]["batch_sizes"] = after["recent_batches"][-batches:] if batches else []
        rows[-1]["server_generate_s"] = after["generate_s"] - mid["generate_s"]
        rows[-1]["server_prepare_s"] = after["prepare_s"] - mid["prepare_s"]
        rows[0]["server_generate_s"] = mid["generate_s"] - before["generate_s"]
        rows[0]["server_prepare_s"] = mid["prepare_s"] - before["prepare_s"]
        rows[-1]["mean_batch"] = (after["batched_rows"] - mid["batched_rows"]) / max(1, batches)
        rows[0]["batches"] = mid["batches"] - before["batches"]
        rows[0]["mean_batch"] = (mid["batched_rows"] - before["batched_rows"]) / max(1, rows[0]["batches"])
        same = sum(1 for a, b in zip(seq, conc) if a[1] is not None and a[1] == b[1])
        if unbatched is not None:
            wall, unb = concurrent(unbatched.url, bodies, args.timeout)
            rows.append(summary(f"{n} concurrent, max batch 1", wall, unb))
            rows[-1]["batches"], rows[-1]["mean_batch"] = n, 1.0
        lost = sum(r["lost"] for r in rows)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()

    print(f"\nmachine: {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}), torch threads "
          f"{args.threads} per server, media {args.media}, "
          f"model {args.cfg_path}, {n} clients, max_tokens {args.max_tokens}, greedy\n")
    print("| mode | wall s | req/s | tokens/s | p50 s | p95 s | batches (mean size) | lost |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['wall_s']:.2f} | {r['req_per_s']:.2f} | {r['tok_per_s']:.0f} | "
              f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['batches']} ({r['mean_batch']:.1f}) | {r['lost']} |")
    speedup = rows[0]["wall_s"] / rows[1]["wall_s"]
    print(f"\nbatched concurrent vs one after another: {speedup:.1f}x faster"
          + (f"; vs concurrent without batching: {rows[2]['wall_s'] / rows[1]['wall_s']:.1f}x" if len(rows) > 2 else ""))
    print("completion tokens per request (mean): " + ", ".join(f"{r['mode']}: {r['tokens'] / max(1, r['ok']):.1f}"
                                                              for r in rows))
    print(f"concurrent answers equal to the one-by-one answers: {same}/{n}")
    print(f"requests lost: {lost}")
    for r in rows[:2]:
        print(f"server side, {r['mode']}: generation {r['server_generate_s']:.2f} s in all, media decoding and "
              f"prompt building {r['server_prepare_s']:.2f} s summed over requests"
              + (f"; batch sizes {r['batch_sizes']}" if r.get("batch_sizes") else ""))
    for r in rows:
        for e in r["errors"]:
            print(f"  {r['mode']}: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "speedup": speedup, "same_answers": same,
                                               "lost": lost}, indent=2))
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
