#!/usr/bin/env python3
"""A persistent tickgate runner (mode = "persistent"), in plain Python 3 with no packages.

tickgate starts this process once and writes one tick input per line on stdin; for each line
the process must write exactly one JSON line on stdout (a second line, or output between
ticks, gets the process restarted). Logs go to stderr, which tickgate logs.

Each tick counts the words of `inputs.text`. Two kinds of state:
- `memory` (in the tick input and output) is durable: tickgate stores it with the task's
  result, so `total_words` survives restarts of this process and of tickgate;
- `seen_by_this_process` lives only as long as this process, like a loaded model or a cache.
"""

import json
import os
import sys

lowercase = os.environ.get("WORDCOUNT_LOWERCASE") == "1"
seen_by_this_process = 0


def tick(tick_input):
    global seen_by_this_process
    inputs = tick_input.get("inputs")
    text = inputs.get("text", "") if isinstance(inputs, dict) else ""
    if not isinstance(text, str):
        return {"status": "error", "response": {"error": "inputs.text must be a string"}}
    words = (text.lower() if lowercase else text).split()
    memory = tick_input.get("memory") or {}
    total = int(memory.get("total_words", 0)) + len(words)
    seen_by_this_process += 1
    return {
        "response": {
            "words": len(words),
            "distinct": len(set(words)),
            "total_words": total,
            "seen_by_this_process": seen_by_this_process,
        },
        "memory": {"total_words": total},
    }


for line in sys.stdin:
    try:
        tick_input = json.loads(line)
        out = tick(tick_input)
        # Echoing the task id lets tickgate match this answer to its input exactly.
        out["task_id"] = tick_input.get("task_id")
    except Exception as e:  # one answer per line, whatever happens
        print(f"wordcount: {e!r}", file=sys.stderr)
        out = {"status": "error", "response": {"error": str(e)}}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
