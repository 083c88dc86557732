#!/bin/sh
# A minimal tick program in POSIX sh: tickgate writes the tick input as one JSON object on stdin
# and reads one JSON object from stdout. This one reports how many bytes it was sent, the tick
# number and a greeting taken from its environment, and keeps the tick number in its memory.
bytes=$(wc -c | tr -d ' ')
printf '{"response":{"greeting":"%s","tick":%s,"input_bytes":%s},"memory":{"last_tick":%s}}\n' \
  "${GREETING:-hi}" "${TICKGATE_TICK:-0}" "$bytes" "${TICKGATE_TICK:-0}"
