#!/usr/bin/env bash
# Runs the A2A SDK interoperability check (tests/a2a_sdk/interop.py) against the real binary:
# installs the official Python SDK (a2a-sdk, pinned) into a virtualenv under target/ once, then
# runs the Rust test that starts tickgate and drives it with the script.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/a2a-sdk-venv
version="${A2A_SDK_VERSION:-1.3.0}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check "a2a-sdk==$version"
A2A_SDK_PYTHON="$PWD/$venv/bin/python" cargo test --test a2a sdk_client_interoperates -- --nocapture
