#!/usr/bin/env python3
"""Measures a running `q4wgpu serve` (needs httpx): aggregate decode tok/s with 1, 2, 4, 8
concurrent streams, and time to first token of a second chat turn with and without the prompt
cache (the cache is defeated by an unrelated request in between; run the server with --parallel 1).

  q4wgpu serve --model M --parallel 8 &   ->   scripts/serve-bench.py http://127.0.0.1:8080 --tokens 128
  q4wgpu serve --model M --parallel 1 &   ->   scripts/serve-bench.py http://127.0.0.1:8080 --ttft

Prints one JSON object per measurement. Standard library only (the GPU machine has no network).
"""
import argparse
import concurrent.futures as cf
import json
import http.client
import time
import urllib.parse


def stream(base, body):
    """Streams one request; returns (seconds to the first content, seconds in all, usage)."""
    start = time.time()
    first = None
    usage = None
    body = dict(body, stream=True, stream_options={"include_usage": True})
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=3600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:500]!r}")
    while True:
        raw = r.readline()
        if not raw:
            break
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.time() - start
    conn.close()
    return first, time.time() - start, usage


def aggregate(base, parallel, tokens):
    body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    start = time.time()
    with cf.ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda _: stream(base, body), range(parallel)))
    seconds = time.time() - start
    made = sum(u["completion_tokens"] for _, _, u in results)
    return {"parallel": parallel, "tokens": made, "seconds": seconds, "tok_per_s": made / seconds}


def ttft(base):
    turn1 = [{"role": "user", "content": "Explain in detail how a compiler turns source code into machine code. " * 8}]
    _, _, u = stream(base, {"messages": turn1, "max_tokens": 64, "temperature": 0})
    answer = "(the first answer)"
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now summarise it."}]
    out = {}
    for cached in (True, False):
        stream(base, {"messages": turn1, "max_tokens": 1, "temperature": 0})
        if not cached:
            stream(base, {"messages": [{"role": "user", "content": "unrelated"}], "max_tokens": 1})
        first, _, usage = stream(base, {"messages": turn2, "max_tokens": 8, "temperature": 0})
        out["cached" if cached else "uncached"] = {"ttft_s": first, "usage": usage}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--parallel", default="1,2,4,8")
    p.add_argument("--ttft", action="store_true")
    a = p.parse_args()
    if a.ttft:
        print(json.dumps(ttft(a.base)))
        return
    for n in map(int, a.parallel.split(",")):
        print(json.dumps(aggregate(a.base, n, a.tokens)), flush=True)


if __name__ == "__main__":
    main()
