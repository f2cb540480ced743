"""A small actor: one mailbox, one owned task that processes messages in order, owned child tasks.

* ``ask(msg)`` sends a message and awaits the reply. A message that expects a reply subclasses :class:`Ask` with
  its reply type (``class Load(Ask[Lookup])``), so ``ask`` is typed: callers never re-annotate. A handler's
  exception goes back to the asker. A handler may return an awaitable (e.g. a shared in-flight load): the asker
  awaits it, shielded so that a cancelled asker never cancels work other askers share.
* ``tell(msg)`` sends without waiting.
* ``stop()`` cancels the loop and every child task, awaits them, and fails every pending ask with
  :class:`ActorStopped`.

Handlers run one at a time and must not block: long work goes to ``spawn``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, Generic, TypeVar, cast

log = logging.getLogger(__name__)

R = TypeVar("R")


class ActorStopped(RuntimeError):
    """The actor was stopped (or never started) before it could answer."""


class Ask(Generic[R]):
    """Base of a message that expects a reply of type ``R``."""

    __slots__ = ()


_Envelope = tuple[object, "asyncio.Future[object] | None", "contextvars.Context | None"]


class Actor:
    name = "actor"

    def __init__(self) -> None:
        # (message, reply, the asker's context: a handler runs in it, so its spans and spawned work join the
        # asker's trace)
        self._mailbox: asyncio.Queue[_Envelope] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._children: set[asyncio.Task[object]] = set()
        self._stopping = False

    # ---- lifecycle
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._task = asyncio.create_task(self._run(), name=f"actor:{self.name}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._task, *self._children) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._children.clear()
        while not self._mailbox.empty():
            _, reply, _ctx = self._mailbox.get_nowait()
            if reply is not None and not reply.done():
                reply.set_exception(ActorStopped(f"{self.name} stopped"))
        await self.on_stopped()

    async def on_stopped(self) -> None:
        """Hook: fail whatever the subclass keeps pending."""

    # ---- messaging
    def tell(self, msg: object) -> None:
        if self._stopping:
            return
        self._mailbox.put_nowait((msg, None, None))

    async def ask(self, msg: Ask[R]) -> R:
        if not self.running:
            raise ActorStopped(f"{self.name} is not running")
        reply: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait((msg, reply, contextvars.copy_context()))
        result = await reply
        if inspect.isawaitable(result):
            return cast(R, await asyncio.shield(result))
        return cast(R, result)

    def spawn(self, coro: Coroutine[Any, Any, R], name: str | None = None) -> asyncio.Task[R]:
        """Start a child task owned by this actor (cancelled and awaited by stop())."""
        task = asyncio.create_task(coro, name=name)
        self._children.add(task)
        task.add_done_callback(self._children.discard)
        return task

    async def _run(self) -> None:
        while True:
            msg, reply, ctx = await self._mailbox.get()
            try:
                result: object = ctx.run(self.receive, msg) if ctx is not None else self.receive(msg)
                if inspect.iscoroutine(result):
                    result = await result
            except asyncio.CancelledError:
                if reply is not None and not reply.done():
                    reply.set_exception(ActorStopped(f"{self.name} stopped"))
                raise
            except Exception as err:  # a handler failure goes back to the asker, the actor lives on
                if reply is not None and not reply.done():
                    reply.set_exception(err)
                else:
                    log.exception("%s: unhandled failure in %r", self.name, type(msg).__name__)
                continue
            if reply is not None and not reply.done():
                reply.set_result(result)

    def receive(self, msg: object) -> object | Awaitable[object]:
        raise NotImplementedError
