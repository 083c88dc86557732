#!/usr/bin/env bash
# Runs the A2A SDK interoperability checks (tests/a2a_sdk/interop.py: the server; runner_interop.py:
# the a2a runner) against the real binary:
# installs the official Python SDK (a2a-sdk, pinned) into a virtualenv under target/ once, then
# runs the Rust test that starts tickgate and drives it with the script.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/a2a-sdk-venv
version="${A2A_SDK_VERSION:-1.3.0}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# The server extra and uvicorn serve the SDK agent that runner_interop.py points the a2a runner at.
"$venv/bin/pip" install -q --disable-pip-version-check "a2a-sdk[http-server]==$version" "uvicorn==0.55.0"
A2A_SDK_PYTHON="$PWD/$venv/bin/python" cargo test --test a2a sdk_client_interoperates -- --nocapture
A2A_SDK_PYTHON="$PWD/$venv/bin/python" cargo test --test a2a_runner sdk_agent_interoperates -- --nocapture
