#!/bin/sh
# A tool-calling agent in the style of an LLM loop, to show ticks that wait for input. Each tick
# reads the tick input (one JSON object) on stdin and writes one JSON object on stdout:
#   1st tick:  asks for a tool result:     {"await": {"request": {"step": 1, "tool": "lookup", ...}}}
#   2nd tick:  (resumed with that answer)  asks for a confirmation, carrying the first answer along
#   3rd tick:  (resumed again)             succeeds with both answers in its response
# The answers arrive in the input's `resume: {"request": …, "response": …}`; the first answer
# travels inside the second request, so the agent keeps no per-task state of its own.
# `inputs.timeout` (e.g. "2s") sets how long each question waits; tickgate's default is 24h.
exec python3 -c '
import json, sys

tick = json.load(sys.stdin)
inputs = tick.get("inputs") if isinstance(tick.get("inputs"), dict) else {}
resume = tick.get("resume")
timeout = inputs.get("timeout")

def ask(request):
    wait = {"request": request}
    if timeout:
        wait["timeout"] = timeout
    return {"await": wait, "steps": request["step"]}

if resume is None:
    out = ask({"step": 1, "tool": "lookup", "args": {"query": inputs.get("query", "weather in Paris")}})
elif resume["request"].get("step") == 1:
    out = ask({"step": 2, "tool": "confirm", "previous": resume["response"]})
else:
    out = {
        "response": {
            "answers": [resume["request"].get("previous"), resume["response"]],
            "query": inputs.get("query", "weather in Paris"),
        },
        "steps": 3,
    }
json.dump(out, sys.stdout)
sys.stdout.write("\n")
'
