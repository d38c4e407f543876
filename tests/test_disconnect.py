"""`CancelOnDisconnect`, the ASGI middleware that stops work for HTTP clients that have gone away.

Driven through the ASGI interface with the messages uvicorn sends: the body, then (once the
connection closes) `http.disconnect`. The end-to-end check, with the real server and a client that
hangs up, is in test_full_size.py.
"""

import asyncio

import pytest

from predictor.protocol.asgi import CancelOnDisconnect

SCOPE = {"type": "http", "method": "POST", "path": "/v1/models/ast:predict"}


class Connection:
    """uvicorn's side: the request body, then `http.disconnect` once the client hangs up."""

    def __init__(self):
        self.hung_up = asyncio.Event()
        self.sent: list[dict] = []
        self.body_given = False

    async def receive(self) -> dict:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self.hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


class Handler:
    """An app that reads its body, starts answering only if told to, and then finishes when released."""

    def __init__(self, answer_first: bool):
        self.answer_first = answer_first
        self.reading_done = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False
        self.finished = False

    async def __call__(self, scope, receive, send) -> None:
        await receive()
        if self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        self.reading_done.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await send({"type": "http.response.body", "body": b"{}"})
        self.finished = True


async def serving(answer_first: bool) -> tuple[Handler, Connection, asyncio.Task]:
    """A request through the middleware, up to the point where its handler has read the body."""
    handler, connection = Handler(answer_first), Connection()
    served = asyncio.create_task(CancelOnDisconnect(handler)(SCOPE, connection.receive, connection.send))
    await handler.reading_done.wait()
    return handler, connection, served


def test_a_client_that_hangs_up_before_the_answer_cancels_the_handler():
    async def main():
        handler, connection, served = await serving(answer_first=False)
        connection.hung_up.set()
        await asyncio.wait_for(served, 10)  # returns quietly: nobody is left to answer
        return handler

    handler = asyncio.run(main())
    assert handler.cancelled and not handler.finished


def test_a_disconnect_after_the_answer_began_lets_the_handler_finish():
    async def main():
        handler, connection, served = await serving(answer_first=True)
        connection.hung_up.set()
        await asyncio.sleep(0)  # the middleware sees the disconnect...
        handler.release.set()  # ...and the handler still finishes
        await asyncio.wait_for(served, 10)
        return handler, connection

    handler, connection = asyncio.run(main())
    assert handler.finished and not handler.cancelled
    assert [m["type"] for m in connection.sent] == ["http.response.start", "http.response.body"]


def test_a_handler_answering_normally_is_untouched():
    async def main():
        handler, _, served = await serving(answer_first=False)
        handler.release.set()
        await asyncio.wait_for(served, 10)
        return handler

    handler = asyncio.run(main())
    assert handler.finished and not handler.cancelled


def test_the_servers_own_cancellation_goes_through():
    """On shutdown the server cancels the request's task: that must not be swallowed as a disconnect."""
    async def main():
        handler, _, served = await serving(answer_first=False)
        served.cancel()
        with pytest.raises(asyncio.CancelledError):
            await served
        return handler

    assert asyncio.run(main()).cancelled
