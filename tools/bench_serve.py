"""Throughput and latency of `mmedge serve` at several numbers of concurrent clients.

    python tools/bench_serve.py PACKAGE [PACKAGE ...] [--clients 1,4,8] [--requests 32] [--new-tokens 16] [--threads 2]

Each package is served by a uvicorn server in this process on a free loopback port (the server `mmedge serve`
runs); C client threads, each with its own openai client, send --requests requests between them, every one a new
shapes-task image and question (so no request finds another's image in the cache), --new-tokens greedy tokens an
answer (EOS ignored: every answer the same length). Prints requests/s, generated tokens/s, and the latency a
client sees (p50, p95), per package and client count. The server runs one request at a time per package; more
clients raise the latency, not the throughput.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{port}/v1"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("packages", type=Path, nargs="+")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    import openai

    from mmedge.runtimes import Pipeline
    from mmedge.serve import ServeConfig, create_app
    from mmedge.tasks import shapes

    print(f"{'package':<28} {'clients':>7} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for path in args.packages:
        pipe = Pipeline.load(path, threads=args.threads)
        name = path.name.removesuffix(".pkg")
        pipe.defaults["ignore_eos"] = True  # every answer --new-tokens long (the API has no such option)
        srv, base = start(create_app({name: pipe}, ServeConfig(max_queue=64)))
        seed = 0
        for clients in (int(c) for c in args.clients.split(",")):
            seed += 1
            examples = list(shapes.examples(args.requests + 1, seed=1000 + seed))
            bodies = [dict(model=name, max_tokens=args.new_tokens, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _uri(ex.image)}}, {"type": "text", "text": ex.prompt}]}])
                for ex in examples]
            local = threading.local()

            def ask(body):
                if not hasattr(local, "client"):
                    local.client = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=600)
                start_t = time.perf_counter()
                reply = local.client.chat.completions.create(**body)
                return time.perf_counter() - start_t, reply.usage.completion_tokens

            ask(bodies[-1])  # warm-up, not counted
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(ask, bodies[:-1]))
            wall = time.perf_counter() - t0
            lat = sorted(d[0] for d in done)
            tokens = sum(d[1] for d in done)
            p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
            print(f"{name:<28} {clients:>7} {len(done) / wall:>7.2f} {tokens / wall:>7.1f} "
                  f"{statistics.median(lat) * 1e3:>8.0f} {p95 * 1e3:>8.0f}", flush=True)
        srv.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
