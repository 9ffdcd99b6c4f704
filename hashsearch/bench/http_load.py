"""A minimal keep-alive HTTP/1.1 client for load generation, on asyncio streams.

A load generator on the server's own cores takes its CPU from the server it
measures.  httpx spends about half a millisecond of Python per request, as
much as the search it times; this sends prepared bytes and parses only the
status line and Content-Length, a few tens of microseconds.  Only what the
benchmark's requests need: no redirects, no chunked bodies, no TLS.
"""
from __future__ import annotations

import asyncio
import secrets


class HttpError(Exception):
    """The connection failed, or the server answered something this client does not read."""


def request_bytes(method: str, path: str, host: str, body: bytes = b"", content_type: str | None = None,
                  headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def multipart(field: str, filename: str, data: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart form holding one file."""
    boundary = secrets.token_hex(12)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Connection:
    """One connection, one request at a time, reopened when the server closes it."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a prepared request (request_bytes); the (status, body) of its answer."""
        for attempt in (0, 1):      # a keep-alive connection the server closed meanwhile is retried once
            if self.writer is None:
                try:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                except OSError as exc:
                    raise HttpError(f"cannot connect: {exc}") from None
            try:
                self.writer.write(raw)
                await self.writer.drain()
                head = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.close()
                if attempt:
                    raise HttpError(f"connection lost: {type(exc).__name__}") from None
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise HttpError(f"not an HTTP answer: {lines[0][:80]!r}") from None
        fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        if "content-length" not in fields:
            self.close()
            raise HttpError(f"an answer without Content-Length (status {status})")
        try:
            body = await self.reader.readexactly(int(fields["content-length"]))
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.close()
            raise HttpError(f"connection lost in a body: {type(exc).__name__}") from None
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
