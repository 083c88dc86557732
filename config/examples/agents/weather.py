#!/usr/bin/env python3
"""A tool-call style tickgate agent (oneshot): asks for one tool result per tick.

Tick input on stdin, one JSON object on stdout. `inputs.cities` lists the cities to look up.
While results are missing, the tick answers with
    {"await": {"request": {"tool": "get_weather", "args": {"city": …}, "collected": {…}},
               "timeout": "1h"}}
which parks the task as AWAITING_INPUT. The answer to that request arrives in the next tick's
`resume` = {"request": <that request>, "response": <the answer>}. The results gathered so far
travel inside the request, so the agent keeps no per-task state of its own (its `memory` is per
agent, shared by all its tasks).
"""

import json
import sys

tick = json.load(sys.stdin)
inputs = tick.get("inputs") if isinstance(tick.get("inputs"), dict) else {}
cities = [c for c in inputs.get("cities", ["Paris"]) if isinstance(c, str)] or ["Paris"]

collected = {}
resume = tick.get("resume")
if resume is not None:
    collected = dict(resume["request"].get("collected", {}))
    collected[resume["request"]["args"]["city"]] = resume["response"]

missing = [c for c in cities if c not in collected]
if missing:
    out = {
        "await": {
            "request": {"tool": "get_weather", "args": {"city": missing[0]}, "collected": collected},
            "timeout": inputs.get("timeout", "1h"),
        },
        "steps": len(collected) + 1,
    }
else:
    out = {"response": {"weather": collected}, "steps": len(collected) + 1}
json.dump(out, sys.stdout)
sys.stdout.write("\n")
