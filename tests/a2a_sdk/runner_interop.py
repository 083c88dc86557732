#!/usr/bin/env python3
"""Interoperability check: tickgate's `a2a` runner against an agent built with the official
A2A Python SDK (`a2a-sdk`, JSON-RPC binding, protocol 1.0).

The script serves a small SDK agent on 127.0.0.1 (bearer token required), starts the tickgate
binary with an agent whose runner is `kind = "a2a"` pointing at the SDK agent's card, and drives
it through tickgate's webhook:

1. a payload naming a city: the SDK agent completes with a data artifact → tickgate's task is
   SUCCESS with that value as `response`;
2. a payload without a city: the SDK agent asks for input → tickgate's task is AWAITING_INPUT
   with the SDK agent's question; the answer (`POST /tasks/{id}/resume`) goes to the same remote
   task, which completes with a text artifact → SUCCESS with that string;
3. an agent configured with the wrong token: the SDK agent refuses it → FAILURE.

`bash tests/a2a_sdk/run.sh` installs the SDK (with its `http-server` extra and uvicorn) and runs
this through the `sdk_agent_interoperates` test of `tests/a2a_runner.rs`; by hand, from the
repository root after `cargo build`:

    python3 -m venv target/a2a-sdk-venv
    target/a2a-sdk-venv/bin/pip install "a2a-sdk[http-server]==1.3.0" "uvicorn==0.55.0"
    target/a2a-sdk-venv/bin/python tests/a2a_sdk/runner_interop.py target/debug/tickgate

It prints one line per check and exits non-zero on the first mismatch.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import uvicorn
from a2a.helpers.proto_helpers import (
    get_data_parts,
    new_data_part,
    new_task_from_user_message,
    new_text_message,
    new_text_part,
)
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.request_handlers import DefaultRequestHandlerV2
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    Role,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

REMOTE_TOKEN = "sdk-remote-token-0123456789abcdef"
HOOK = "interop-hook-token-0123456789-abcdefghij"
BAD_HOOK = "interop-badhook-token-0123456789-abcdefg"
DEADLINE = 60.0


class WeatherAgent(AgentExecutor):
    """Answers a tickgate tick: with a city in `inputs`, at once (data artifact); without, it
    asks which city and answers the follow-up message (text artifact)."""

    async def execute(self, context: RequestContext, event_queue) -> None:
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        data = get_data_parts(context.message.parts)
        first = data[0] if data and isinstance(data[0], dict) else {}
        if "agent" in first and "inputs" in first:
            city = (first.get("inputs") or {}).get("city")
            if city:
                await updater.add_artifact(
                    [new_data_part({"forecast": f"sunny in {city}", "tick_task": first["task_id"]})]
                )
                await updater.complete()
            else:
                await updater.requires_input(
                    new_text_message("Which city?", context_id=task.context_id, task_id=task.id,
                                     role=Role.ROLE_AGENT)
                )
            return
        city = first.get("city", "nowhere")
        await updater.add_artifact([new_text_part(f"sunny in {city}")])
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue) -> None:
        task = context.current_task
        await TaskUpdater(event_queue, task.id, task.context_id).cancel()


class Bearer(BaseHTTPMiddleware):
    """The JSON-RPC endpoint wants `Authorization: Bearer REMOTE_TOKEN`; the card is public."""

    async def dispatch(self, request, call_next):
        if request.url.path == "/rpc" and request.headers.get("authorization") != f"Bearer {REMOTE_TOKEN}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def sdk_app(port: int) -> Starlette:
    card = AgentCard(
        name="sdk-weather",
        description="A2A SDK agent for tickgate's interoperability check",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=f"http://127.0.0.1:{port}/rpc", protocol_binding="JSONRPC",
                           protocol_version="1.0"),
        ],
        capabilities=AgentCapabilities(streaming=False),
        security_schemes={"bearer": SecurityScheme(
            http_auth_security_scheme=HTTPAuthSecurityScheme(scheme="Bearer"))},
        security_requirements=[SecurityRequirement(schemes={"bearer": StringList(list=[])})],
        default_input_modes=["application/json", "text/plain"],
        default_output_modes=["application/json", "text/plain"],
        skills=[AgentSkill(id="weather", name="Weather", description="Forecasts", tags=["weather"])],
    )
    handler = DefaultRequestHandlerV2(agent_executor=WeatherAgent(), task_store=InMemoryTaskStore(),
                                      agent_card=card)
    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/rpc")
    app = Starlette(routes=routes)
    app.add_middleware(Bearer)
    return app


def serve_sdk_agent() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(sdk_app(port), log_level="warning"))
    threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True).start()
    deadline = time.time() + DEADLINE
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/agent-card.json", timeout=5)
            return port
        except OSError:
            time.sleep(0.05)
    sys.exit("the SDK agent did not start")


def start_tickgate(binary: str, port: int, workdir: str) -> tuple[subprocess.Popen, str]:
    card = f"http://127.0.0.1:{port}/.well-known/agent-card.json"
    config = os.path.join(workdir, "tickgate.toml")
    with open(config, "w") as f:
        f.write(f"""
[[agent]]
name = "weather"
runner = {{ kind = "a2a", url = "{card}", token_env = "SDK_TOKEN" }}
tick_timeout = "30s"
[agent.webhook]
token_env = "WEATHER_HOOK"

[[agent]]
name = "wrong-token"
runner = {{ kind = "a2a", url = "{card}", token_env = "WRONG_TOKEN" }}
[agent.webhook]
token_env = "BAD_HOOK"
""")
    env = dict(os.environ, TICKGATE_SERVER_LISTEN="127.0.0.1:0",
               TICKGATE_STORE_PATH=os.path.join(workdir, "store"), SDK_TOKEN=REMOTE_TOKEN,
               WRONG_TOKEN="not-the-token", WEATHER_HOOK=HOOK, BAD_HOOK=BAD_HOOK)
    env.pop("TICKGATE_ADMIN_TOKEN", None)
    proc = subprocess.Popen([binary, "serve", "--config", config], env=env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = None
    deadline = time.time() + DEADLINE
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("tickgate listening on "):
            base = line.split()[3]
        if line.startswith("tickgate serving ") and base:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, base
    proc.kill()
    sys.exit("tickgate did not start")


def call(method: str, url: str, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def check(what: str, cond: bool, detail) -> None:
    print(f"{'ok  ' if cond else 'FAIL'} {what}")
    if not cond:
        print(f"     {detail}")
        sys.exit(1)


def main() -> None:
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/tickgate"
    binary = os.path.abspath(binary)
    from importlib.metadata import version
    print(f"a2a-sdk {version('a2a-sdk')}")
    port = serve_sdk_agent()
    with tempfile.TemporaryDirectory() as workdir:
        proc, base = start_tickgate(binary, port, workdir)
        try:
            status, task = call("POST", f"{base}/webhooks/{HOOK}?wait=60", {"city": "Oslo"})
            check("completed with a data artifact → SUCCESS, response = the data",
                  status == 200 and task["status"] == "SUCCESS"
                  and task["response"] == {"forecast": "sunny in Oslo", "tick_task": task["task_id"]},
                  task)

            status, task = call("POST", f"{base}/webhooks/{HOOK}?wait=60", {"question": "weather?"})
            request = (task.get("awaiting") or {}).get("request") or {}
            check("input-required → AWAITING_INPUT with the SDK agent's question and task id",
                  status == 200 and task["status"] == "AWAITING_INPUT"
                  and request.get("parts", [{}])[0].get("text") == "Which city?"
                  and bool(request.get("taskId")), task)
            task_id = task["task_id"]
            status, _ = call("POST", f"{base}/tasks/{task_id}/resume", {"response": {"city": "Bergen"}},
                             token=HOOK)
            check("the resume is accepted", status < 300, status)
            deadline = time.time() + DEADLINE
            while time.time() < deadline:
                _, task = call("GET", f"{base}/tasks/{task_id}")
                if task["status"] in ("SUCCESS", "FAILURE"):
                    break
                time.sleep(0.05)
            check("the resume continues the same SDK task → SUCCESS with its text artifact",
                  task["status"] == "SUCCESS" and task["response"] == "sunny in Bergen"
                  and task["result"]["a2a"]["taskId"] == request["taskId"], task)

            status, task = call("POST", f"{base}/webhooks/{BAD_HOOK}?wait=60", {"city": "Oslo"})
            check("a wrong bearer token → FAILURE naming the refusal",
                  status == 200 and task["status"] == "FAILURE"
                  and "refused the credentials" in (task.get("error") or ""), task)
        finally:
            proc.kill()
            proc.wait()
    print("runner interop: all checks passed")


if __name__ == "__main__":
    main()
