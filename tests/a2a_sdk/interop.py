#!/usr/bin/env python3
"""Interoperability check: the official A2A Python SDK (`a2a-sdk`, 1.x) drives tickgate's A2A
server. It starts nothing itself: give it the JSON-RPC URL of an A2A-enabled echo agent and its
webhook token (and optionally the URL and token of an agent running config/agents/toolcall.sh for
the input-required round trip). Exits non-zero on the first mismatch.

    python3 tests/a2a_sdk/interop.py --url http://127.0.0.1:8080/a2a/default/echo --token T \
        [--toolcall-url http://127.0.0.1:8080/a2a/default/toolcall --toolcall-token T2]

`tests/a2a.rs` (`sdk_client_interoperates`) runs it against the real binary when the SDK is
installed for the interpreter named by `A2A_SDK_PYTHON` (default `python3`).
"""

import argparse
import asyncio
import sys
from importlib.metadata import version

import httpx
from a2a.client import A2ACardResolver, A2AClientError, ClientConfig, ClientFactory
from a2a.helpers.proto_helpers import new_data_part, new_message, new_text_part
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Role,
    SendMessageRequest,
    TaskState,
)
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError, UnsupportedOperationError


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


async def client_for(url, token, streaming, polling=False):
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
    card = await A2ACardResolver(http, url).get_agent_card()
    config = ClientConfig(streaming=streaming, polling=polling, httpx_client=http)
    return card, ClientFactory(config).create(card)


def user_message(*parts, task_id=None, context_id=None):
    return new_message(list(parts), task_id=task_id, context_id=context_id, role=Role.ROLE_USER)


async def events(client, message):
    return [e async for e in client.send_message(SendMessageRequest(message=message))]


async def echo_checks(url, token):
    card, client = await client_for(url, token, streaming=False)
    check(card.capabilities.streaming, "card: streaming capability")
    check(card.supported_interfaces[0].protocol_version == "1.0", "card: protocol version 1.0")
    check("bearer" in card.security_schemes, "card: bearer security scheme")

    # Blocking send: the completed task with the response as its artifact.
    out = await events(client, user_message(new_text_part("hello"), new_data_part({"n": 1})))
    task = out[-1].task
    check(task.status.state == TaskState.TASK_STATE_COMPLETED, "SendMessage (blocking) completes")
    check(len(task.artifacts) == 1 and task.artifacts[0].parts[0].HasField("data"),
          "the response is a data artifact")

    got = await client.get_task(GetTaskRequest(id=task.id))
    check(got.id == task.id and got.status.state == TaskState.TASK_STATE_COMPLETED, "GetTask")
    listed = await client.list_tasks(ListTasksRequest(page_size=10))
    check(any(t.id == task.id for t in listed.tasks), "ListTasks shows the task")
    try:
        await client.cancel_task(CancelTaskRequest(id=task.id))
        check(False, "CancelTask on a finished task fails")
    except TaskNotCancelableError:
        check(True, "CancelTask on a finished task is TaskNotCancelable")
    try:
        await client.get_task(GetTaskRequest(id="00000000-0000-4000-8000-000000000000"))
        check(False, "GetTask of an unknown task fails")
    except TaskNotFoundError:
        check(True, "GetTask of an unknown task is TaskNotFound")
    try:
        await events(client, user_message(new_text_part("more"), task_id=task.id))
        check(False, "a message to a finished task fails")
    except UnsupportedOperationError:
        check(True, "a message to a finished task is UnsupportedOperation")

    # Non-blocking send, then polling.
    _, polling = await client_for(url, token, streaming=False, polling=True)
    first = (await events(polling, user_message(new_text_part("later"))))[-1].task
    check(first.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING,
                                 TaskState.TASK_STATE_COMPLETED), "SendMessage (returnImmediately)")
    for _ in range(300):
        t = await polling.get_task(GetTaskRequest(id=first.id))
        if t.status.state == TaskState.TASK_STATE_COMPLETED:
            break
        await asyncio.sleep(0.1)
    check(t.status.state == TaskState.TASK_STATE_COMPLETED, "the polled task completes")

    # Streaming: the task first, then updates, ending at the terminal state.
    _, streaming = await client_for(url, token, streaming=True)
    out = await events(streaming, user_message(new_text_part("stream")))
    check(out[0].HasField("task"), "SendStreamingMessage starts with the task")
    last = out[-1]
    check(last.HasField("status_update")
          and last.status_update.status.state == TaskState.TASK_STATE_COMPLETED,
          "the stream ends with the completed status")
    check(any(e.HasField("artifact_update") for e in out), "the stream carries the artifact")

    # A wrong token is refused before anything runs.
    _, bad = await client_for(url, "wrong-token", streaming=False)
    try:
        await events(bad, user_message(new_text_part("x")))
        check(False, "a wrong token is refused")
    except A2AClientError as e:
        check("401" in str(e), "a wrong token is HTTP 401")


async def toolcall_checks(url, token):
    _, client = await client_for(url, token, streaming=False)
    out = await events(client, user_message(new_text_part("plan a trip")))
    task = out[-1].task
    check(task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, "input required")
    for answer in ("sunny", "confirmed"):
        out = await events(client, user_message(new_text_part(answer), task_id=task.id,
                                                context_id=task.context_id))
        task = out[-1].task
    check(task.status.state == TaskState.TASK_STATE_COMPLETED,
          "two answers complete the task (input-required round trip)")


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--toolcall-url")
    p.add_argument("--toolcall-token")
    a = p.parse_args()
    print(f"a2a-sdk {version('a2a-sdk')}")
    await echo_checks(a.url, a.token)
    if a.toolcall_url:
        await toolcall_checks(a.toolcall_url, a.toolcall_token)
    print("interop: all checks passed")


if __name__ == "__main__":
    asyncio.run(main())
