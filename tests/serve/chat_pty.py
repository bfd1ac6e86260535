"""Drives `q4wgpu chat` through a pseudo-terminal, as a person would; run by tests/chat.rs.

Usage: chat_pty.py Q4WGPU_BINARY ARG...   (the arguments after `chat`)
Two turns (the second reuses the first from the KV cache), /reset, a third turn, a long answer
stopped with Ctrl-C (the session goes on), one more turn, /exit. Raises on any failure.
"""
import os
import pty
import re
import select
import sys
import time

BIN, ARGS = sys.argv[1], sys.argv[2:]
pid, fd = pty.fork()
if pid == 0:
    os.execv(BIN, [BIN, "chat"] + ARGS)

seen = ""


def read_until(pattern, timeout=120):
    """Reads the terminal until `pattern` (a regex) matches the text read since the last call."""
    global seen
    start = len(seen)
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, seen[start:])
        if m:
            return seen[start:start + m.end()]
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            seen += data.decode("utf-8", "replace")
    raise AssertionError(f"timed out waiting for {pattern!r}; the terminal showed:\n{seen[-3000:]}")


def send(text):
    os.write(fd, text.encode())


PROMPT = r">>> $"
STATS = r"\((\d+) tokens in [\d.]+ s; prompt (\d+) tokens, (\d+) from the cache\)\r?\n"

read_until(PROMPT)
send("hello there\r")
turn1 = read_until(STATS + r".*" + PROMPT)
p1 = re.search(STATS, turn1)
print("turn 1:", p1.group(0).strip(), flush=True)

send("tell me more\r")
turn2 = read_until(STATS + r".*" + PROMPT)
p2 = re.search(STATS, turn2)
print("turn 2:", p2.group(0).strip(), flush=True)
# Turn 2's prompt holds turn 1 (question and answer): most of it comes from the cache.
assert int(p2.group(2)) > int(p1.group(2)), (p1.group(0), p2.group(0))
assert int(p2.group(3)) >= int(p1.group(2)), f"turn 2 did not reuse turn 1's cache: {p2.group(0)}"

send("/reset\r")
read_until(r"\(new conversation\)")
read_until(PROMPT)
send("hello there\r")
turn3 = read_until(STATS + r".*" + PROMPT)
p3 = re.search(STATS, turn3)
print("after /reset:", p3.group(0).strip(), flush=True)
# A fresh conversation: the same prompt as turn 1, so the same length, and the same answer.
assert p3.group(2) == p1.group(2), (p1.group(0), p3.group(0))
# The answer: the text before the statistics line.
answer = lambda t: t[: re.search(STATS, t).start()]
assert answer(turn3) == answer(turn1), (turn1, turn3)

send("/system You are terse.\r")
read_until(r"system message set")
read_until(PROMPT)
send("write a very long story\r")
read_until(r"story\r?\n")
read_until(r"\S{3}", timeout=60)  # the answer has begun
send("\x03")
stopped = read_until(r"\(stopped\).*" + PROMPT, timeout=60)
print("Ctrl-C stopped the answer", flush=True)

send("are you still there?\r")
turn5 = read_until(STATS + r".*" + PROMPT)
print("after Ctrl-C:", re.search(STATS, turn5).group(0).strip(), flush=True)
send("/exit\r")
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("all passed", flush=True)
