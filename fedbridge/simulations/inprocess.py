"""A Grid that delivers messages straight to a ClientApp in this process: no Ray, no SuperLink.

For tests and quick runs. It behaves like Flower's runtime where methods can tell: message ids, replies
that carry errors when a handler raises, and asynchronous delivery (handlers run on worker threads). It does not
expire messages: a method's own deadline (CrossLM's TTL, ``timeout``) is what drops a silent silo here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0
CLIENT_APP_EXCEPTION = 0  # the error code Flower's runtime uses when a ClientApp raises


class InProcessGrid(Grid):
    """Routes each message to ``client_app(message, context)`` of its destination node."""

    def __init__(self, client_app: ClientApp, run_config: Mapping, node_configs: list[dict], run_id: int = 1,
                 workers: int = 1, before_handle: Callable[[int, Message], None] | None = None) -> None:
        self.client_app, self.run_id, self.before_handle = client_app, run_id, before_handle
        self.contexts = {1000 + i: Context(run_id=run_id, node_id=1000 + i, node_config=dict(nc), state=RecordDict(),
                                           run_config=dict(run_config)) for i, nc in enumerate(node_configs)}
        self.sent: list[Message] = []  # every message pushed, for tests that inspect the wire
        self.replied: list[tuple[float, Message, Message]] = []  # (when the handler finished, request, reply)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="silo")
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1

    def set_run(self, run_id: int) -> None:
        self.run_id = run_id

    @property
    def run(self):  # noqa: ANN201 - Flower's Run is not needed in-process
        raise NotImplementedError("InProcessGrid has no Run object")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _handle(self, msg: Message) -> Message:
        try:
            if self.before_handle:
                self.before_handle(msg.metadata.dst_node_id, msg)
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # the runtime turns a raising ClientApp into an error reply
            reply = Message(Error(CLIENT_APP_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        with self._lock:
            self.replied.append((time.perf_counter(), msg, reply))
        return reply

    def sent_of(self, message_type: str) -> dict[int, Message]:
        return {m.metadata.dst_node_id: m for m in self.sent if m.metadata.message_type == message_type}

    def replies_of(self, message_type: str) -> dict[int, Message]:
        return {req.metadata.dst_node_id: rep for _, req, rep in self.replied
                if req.metadata.message_type == message_type}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"unknown node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            with self._lock:
                self.sent.append(msg)
                self._futures[msg.metadata.message_id] = self._pool.submit(self._handle, msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            done = [i for i in message_ids if i in self._futures and self._futures[i].done()]
            return [self._futures.pop(i).result() for i in done]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        wait([self._futures[i] for i in ids], timeout=timeout)
        return self.pull_messages(ids)

    def close(self) -> None:
        """Cancel what has not started and wait for running handlers, so none outlives the run."""
        self._pool.shutdown(wait=True, cancel_futures=True)
