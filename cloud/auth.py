"""Per-device bearer tokens: a hashed token file and a grpc.aio server interceptor.

    token = add_device("tokens.txt", "jetson-07")   # new random token, printed once by the CLI
    store = TokenStore.load("tokens.txt")           # lines: `device-id sha256-hex` (# comments)
    store.device_for("the token")                   # "jetson-07", or None
    server = grpc.aio.server(interceptors=[TokenAuth(store)])

The server keeps only sha256(token); a leaked token file does not reveal any token. Clients send
`authorization: Bearer <token>` metadata on every call. Calls to coach.v1 without a valid token end
with UNAUTHENTICATED; the health and reflection services stay open (load balancers probe them).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from cloud.refusal import refuse_stream

SERVICE_PREFIX = "/coach.v1."
_DEVICE_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry in gRPC metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, tok = value.strip().partition(" ")
            if scheme.lower() == "bearer" and tok.strip():
                return tok.strip()
    return None


@dataclass(frozen=True)
class TokenStore:
    by_hash: dict[str, str]  # sha256 hex -> device id

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        """Parse a token file; ValueError naming the file and line on anything malformed."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the token file ({exc.strerror})") from None
        by_hash: dict[str, str] = {}
        seen: set[str] = set()
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not _DEVICE_RE.match(parts[0]) or not _HEX_RE.match(parts[1].lower()):
                raise ValueError(f"{path}:{n}: expected 'device-id sha256-hex' (64 hex digits)")
            device, digest = parts[0], parts[1].lower()
            if device in seen:
                raise ValueError(f"{path}:{n}: device '{device}' listed twice")
            seen.add(device)
            by_hash[digest] = device
        return cls(by_hash)

    def device_for(self, token: str | None) -> str | None:
        if not token:
            return None
        return self.by_hash.get(hash_token(token))


def add_device(path: str | Path, device_id: str) -> str:
    """Append a device with a new random token to the token file (created 0600); return the token."""
    if not _DEVICE_RE.match(device_id):
        raise ValueError(f"device id '{device_id}': use 1-128 letters, digits or . _ : @ -")
    path = Path(path)
    if path.exists():
        if device_id in TokenStore.load(path).by_hash.values():
            raise ValueError(f"{path}: device '{device_id}' already has a token; remove its line to re-issue one")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        if f.tell() == 0:
            f.write("# coach cloud device tokens: device-id sha256(token)\n")
        f.write(f"{device_id} {hash_token(token)}\n")
    return token


def _deny_handler(handler, message: str):
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator, context):
        if handler.request_streaming:
            await refuse_stream(request_or_iterator, context, grpc.StatusCode.UNAUTHENTICATED, message)
        else:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return
        yield  # pragma: no cover  (makes this an async generator)

    if handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(deny_stream, request_deserializer=None,
                    response_serializer=handler.response_serializer)
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(deny_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Rejects coach.v1 calls without a valid bearer token."""

    def __init__(self, store: TokenStore):
        self.store = store

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        if self.store.device_for(token) is not None:
            return handler
        why = "no 'authorization: Bearer <token>' metadata" if token is None else "the bearer token is not valid"
        return _deny_handler(handler, f"{why}; get a device token from the server's operator "
                                      "(coach cloud add-device) and pass it to the client")
