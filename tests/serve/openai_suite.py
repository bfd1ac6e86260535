"""Drives `q4wgpu serve` with the official openai client and raw httpx; run by tests/serve.rs.

Usage: openai_suite.py MODE BASE_URL MODEL API_KEY EXPECTED_JSON
MODE: "full" (the API suite), "queue" (a full queue answers 429), "gpu" (slots on the GPU).
EXPECTED_JSON maps prompts to the text `q4wgpu run --json` generated for them (the oracle).
Each check prints a line; any failure raises, and the exit status is non-zero.
"""
import concurrent.futures as cf
import json
import sys
import time

import httpx
import openai

MODE, BASE, MODEL, KEY, EXPECTED = sys.argv[1:6]
EXPECTED = json.loads(EXPECTED)
client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY or "none", max_retries=0, timeout=120)
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}


def ok(name):
    print("ok", name, flush=True)


def greedy_completion(prompt, n, **kw):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, **kw)
    return r


def metrics():
    text = httpx.get(BASE + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.split()
            out[k] = float(v)
    return out


def sse_events(resp):
    """The data payloads of an SSE response, checking the framing of every event."""
    events = []
    buf = b""
    for chunk in resp.iter_bytes():
        buf += chunk
    assert buf.endswith(b"\n\n"), buf[-40:]
    for block in buf.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block[:40]
        assert b"\n" not in block, block
        events.append(block[len(b"data: "):].decode())
    assert events[-1] == "[DONE]", events[-1]
    return [json.loads(e) for e in events[:-1]]


def check_oracle():
    for prompt, want in EXPECTED.items():
        r = greedy_completion(prompt, 16, extra_body={"ignore_eos": True})
        got = r.choices[0].text
        assert got == want, (prompt, got, want)
        assert r.usage.completion_tokens == 16, r.usage
    ok(f"greedy answers equal `q4wgpu run` for {len(EXPECTED)} prompts")


def check_basics():
    assert httpx.get(BASE + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL], models
    ok("health and models")

    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 8
    whole = r.choices[0].message.content
    # The same request streamed gives the same text, and OpenAI's chunk sequence.
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi there"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    last = chunks[-2].choices[0]
    assert last.finish_reason == r.choices[0].finish_reason and not last.delta.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert streamed == whole, (streamed, whole)
    ok("chat, whole and streamed, agree")

    c = greedy_completion("The cat", 10)
    s = client.completions.create(model=MODEL, prompt="The cat", max_tokens=10, temperature=0, stream=True)
    parts = list(s)
    assert "".join(p.choices[0].text for p in parts) == c.choices[0].text
    assert parts[-1].choices[0].finish_reason == c.choices[0].finish_reason
    ok("completions, whole and streamed, agree")

    # Prompt as token ids gives the same answer as the text.
    ids = httpx.post(BASE + "/tokenize", json={"content": "The cat"}, headers=HEADERS).json()["tokens"]
    t = greedy_completion(ids, 10)
    assert t.choices[0].text == c.choices[0].text
    back = httpx.post(BASE + "/detokenize", json={"tokens": ids}, headers=HEADERS).json()["content"]
    assert back == "The cat", back
    ok("tokenize, detokenize, token-id prompts")


def check_stop_seed_logprobs():
    base = greedy_completion("Once upon", 24, extra_body={"ignore_eos": True}).choices[0].text
    # A stop string taken from the middle of the greedy answer: the answer ends right before it.
    stop = base[8:11]
    assert stop, base
    cut = base[: base.index(stop)]
    r = greedy_completion("Once upon", 24, stop=[stop, "never-appears"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop", (r.choices[0].text, cut)
    streamed = "".join(
        p.choices[0].text
        for p in client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, stop=stop, stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed == cut and stop not in streamed, (streamed, cut)
    ok("stop strings end the answer and never leak into the stream")

    def sampled(seed):
        return client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=16, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True},
        ).choices[0].text

    a, b = sampled(1), sampled(1)
    assert a == b, (a, b)
    assert len({sampled(s) for s in range(2, 6)} | {a}) > 1
    ok("seeds: the same seed repeats, other seeds differ")

    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5, e
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens
    ok("logprobs and top_logprobs")


def check_raw_sse():
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 4,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", BASE + "/v1/chat/completions", json=body, headers=HEADERS) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    first, final, usage = events[0], events[-2], events[-1]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None and first["usage"] is None
    for e in events[1:-2]:
        assert set(e["choices"][0]["delta"]) == {"content"} and e["choices"][0]["finish_reason"] is None
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    assert len({e["id"] for e in events}) == 1
    ok("raw SSE framing: role chunk, deltas, finish chunk, usage chunk, [DONE]")


def check_bad_requests():
    url = BASE + "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        ("malformed JSON", dict(content=b'{"messages": [', headers={"content-type": "application/json"}), 400),
        ("not an object", dict(json=[1, 2]), 400),
        ("wrong type", dict(json={"messages": msg, "max_tokens": "ten"}), 400),
        ("wrong type temperature", dict(json={"messages": msg, "temperature": "hot"}), 400),
        ("messages not a list", dict(json={"messages": "hi"}), 400),
        ("unknown model", dict(json={"model": "gpt-9", "messages": msg}), 404),
        ("empty messages", dict(json={"messages": []}), 400),
        ("bad role", dict(json={"messages": [{"role": "wizard", "content": "x"}]}), 400),
        ("max_tokens 0", dict(json={"messages": msg, "max_tokens": 0}), 400),
        ("max_tokens huge", dict(json={"messages": msg, "max_tokens": 10**9}), 400),
        ("n 2", dict(json={"messages": msg, "n": 2}), 400),
        ("prompt over the context", dict(json={"messages": [{"role": "user", "content": "a b " * 5000}]}), 400),
        ("2 MB body", dict(json={"messages": [{"role": "user", "content": "z" * (2 << 20)}]}), 413),
        ("invalid UTF-8", dict(content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                               headers={"content-type": "application/json"}), 400),
    ]
    for name, kw, status in cases:
        headers = dict(HEADERS)
        headers.update(kw.pop("headers", {}))
        r = httpx.post(url, headers=headers, timeout=60, **kw)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["message"] and err["type"], (name, err)
        print("   ", name, "->", status, err["message"][:100], flush=True)
    r = httpx.post(BASE + "/v1/completions", json={"prompt": [10**6]}, headers=HEADERS)
    assert r.status_code == 400, r.text
    r = httpx.get(BASE + "/v1/nothing", headers=HEADERS)
    assert r.status_code == 404 and r.json()["error"]["message"]
    if KEY:
        r = httpx.post(url, json={"messages": msg})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        r = httpx.post(url, json={"messages": msg}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, r.text
        try:
            openai.OpenAI(base_url=BASE + "/v1", api_key="wrong", max_retries=0).models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
    # Still serving.
    assert greedy_completion("still there?", 3).usage.completion_tokens > 0
    ok(f"{len(cases) + 2 + (3 if KEY else 0)} bad requests: each a clear 4xx, and the server keeps serving")


def check_concurrency(prompts, n_clients, max_tokens):
    single = {p: greedy_completion(p, max_tokens, extra_body={"ignore_eos": True}).choices[0].text for p in prompts}
    jobs = [prompts[i % len(prompts)] for i in range(n_clients)]

    def one(i_p):
        i, p = i_p
        if i % 2:
            return p, greedy_completion(p, max_tokens, extra_body={"ignore_eos": True}).choices[0].text
        s = client.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        return p, "".join(c.choices[0].text for c in s)

    with cf.ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(one, enumerate(jobs)))
    for p, text in results:
        assert text == single[p], (p, text, single[p])
    ok(f"{n_clients} concurrent clients (half streaming) all finish with the single-client greedy answers")


def check_disconnect():
    before = metrics()
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", BASE + "/v1/completions", json=body, headers=HEADERS) as resp:
        it = resp.iter_lines()
        for _ in range(3):
            next(it)
    # The stream is closed: the slot must be free within a step.
    deadline = time.time() + 10
    while time.time() < deadline:
        m = metrics()
        if m["q4wgpu_requests_cancelled_total"] > before["q4wgpu_requests_cancelled_total"] and m["q4wgpu_slots_busy"] == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the dropped stream's slot was not freed: {metrics()}")
    made = m["q4wgpu_generated_tokens_total"] - before["q4wgpu_generated_tokens_total"]
    assert made < 3000, made
    assert greedy_completion("after", 2).usage.completion_tokens > 0
    ok(f"a client dropped mid-stream frees its slot (after {made:.0f} of 3000 tokens)")


def check_prompt_cache():
    first = "In a quiet village by the sea there lived"
    greedy_completion(first, 4)
    longer = first + " an old fisherman"
    r = greedy_completion(longer, 16, extra_body={"ignore_eos": True})
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached > 0, r.usage
    if longer in EXPECTED:
        assert r.choices[0].text == EXPECTED[longer], (r.choices[0].text, EXPECTED[longer])
    ok(f"prompt cache: {cached} of {r.usage.prompt_tokens} prompt tokens reused, same answer")


def check_queue_full():
    body = {"model": MODEL, "prompt": "busy", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}

    def one(_):
        return httpx.post(BASE + "/v1/completions", json=body, headers=HEADERS, timeout=120).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    m = metrics()
    assert m["q4wgpu_requests_rejected_total"] == codes.count(429), m
    assert greedy_completion("after", 2).usage.completion_tokens > 0
    ok(f"a full queue answers 429 ({codes.count(429)} of 8) and the server keeps serving")


if MODE == "full":
    check_basics()
    check_oracle()
    check_stop_seed_logprobs()
    check_raw_sse()
    check_bad_requests()
    check_concurrency(["alpha", "bravo charlie", "delta echo foxtrot", "golf"], 32, 12)
    check_disconnect()
    check_prompt_cache()
elif MODE == "queue":
    check_queue_full()
elif MODE == "gpu":
    check_oracle()
    check_concurrency(list(EXPECTED), 12, 16)
    check_prompt_cache()
    check_disconnect()
else:
    raise SystemExit(f"unknown mode {MODE}")
print("all passed", flush=True)
