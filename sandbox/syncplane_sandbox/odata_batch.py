"""The OData ``$batch`` wire format as Dataverse documents it (OData 4.0 §11.7):
``multipart/mixed`` bodies whose parts are ``application/http`` requests or change
sets (nested ``multipart/mixed``), and the matching multipart response.

A request part looks like::

    --batch_AAA
    Content-Type: application/http
    Content-Transfer-Encoding: binary
    Content-ID: 1

    PATCH http://host/api/data/v9.2/contacts(00000000-...) HTTP/1.1
    Content-Type: application/json

    {"firstname": "Ada"}
    --batch_AAA--

The parser accepts CRLF or bare LF line ends and quoted or bare boundaries."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

MAX_BATCH_REQUESTS = 1000


class BatchFormatError(ValueError):
    """The body is not a well-formed batch."""


@dataclass(slots=True)
class BatchRequest:
    method: str
    url: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    content_id: str | None = None


@dataclass(slots=True)
class ChangeSet:
    requests: list[BatchRequest] = field(default_factory=list)


BatchItem = BatchRequest | ChangeSet


@dataclass(slots=True)
class PartResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    content_id: str | None = None


_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a ``multipart/mixed`` content type."""
    if not content_type.lower().lstrip().startswith("multipart/mixed"):
        raise BatchFormatError("Content-Type must be multipart/mixed with a boundary")
    match = _BOUNDARY.search(content_type)
    if not match:
        raise BatchFormatError("multipart/mixed without a boundary")
    return match.group(1) or match.group(2)


def _split(body: bytes, boundary: str) -> list[bytes]:
    data = b"\n" + body.replace(b"\r\n", b"\n")
    chunks = data.split(b"\n--" + boundary.encode())
    if len(chunks) < 2:
        raise BatchFormatError(f"no part delimited by --{boundary}")
    parts: list[bytes] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return parts
        nl = chunk.find(b"\n")
        if nl < 0 or chunk[:nl].strip():
            raise BatchFormatError("malformed boundary line")
        parts.append(chunk[nl + 1:])
    raise BatchFormatError(f"missing closing delimiter --{boundary}--")


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BatchFormatError(f"malformed header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def _head_and_body(part: bytes) -> tuple[bytes, bytes]:
    head, sep, rest = part.partition(b"\n\n")
    if not sep:
        if part.strip():
            return part, b""
        raise BatchFormatError("empty part")
    return head, rest


def _request(mime_headers: dict[str, str], content: bytes) -> BatchRequest:
    if not mime_headers.get("content-type", "").lower().startswith("application/http"):
        raise BatchFormatError("a batch part must be application/http or a multipart/mixed change set")
    head, body = _head_and_body(content.lstrip(b"\n"))
    lines = head.decode("utf-8", "replace").split("\n")
    request_line = lines[0].strip().split()
    if len(request_line) not in (2, 3) or not request_line[0].isalpha():
        raise BatchFormatError(f"malformed request line {lines[0]!r}")
    headers = _headers("\n".join(lines[1:]).encode())
    content_id = mime_headers.get("content-id") or headers.get("content-id")
    return BatchRequest(request_line[0].upper(), request_line[1], headers, body.strip(), content_id)


def parse_batch(content_type: str, body: bytes) -> list[BatchItem]:
    """Parse a batch body into requests and change sets (no nested change sets)."""
    items: list[BatchItem] = []
    for part in _split(body, boundary_of(content_type)):
        head, content = _head_and_body(part)
        mime = _headers(head)
        ctype = mime.get("content-type", "")
        if ctype.lower().startswith("multipart/mixed"):
            changeset = ChangeSet()
            for inner in _split(content, boundary_of(ctype)):
                inner_head, inner_content = _head_and_body(inner)
                inner_mime = _headers(inner_head)
                if inner_mime.get("content-type", "").lower().startswith("multipart/"):
                    raise BatchFormatError("change sets cannot be nested")
                changeset.requests.append(_request(inner_mime, inner_content))
            if not changeset.requests:
                raise BatchFormatError("empty change set")
            items.append(changeset)
        else:
            items.append(_request(mime, content))
    return items


def count_requests(items: list[BatchItem]) -> int:
    return sum(len(i.requests) if isinstance(i, ChangeSet) else 1 for i in items)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _write_part(out: list[bytes], boundary: str, resp: PartResponse) -> None:
    out.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n".encode())
    if resp.content_id is not None:
        out.append(f"Content-ID: {resp.content_id}\r\n".encode())
    out.append(f"\r\nHTTP/1.1 {resp.status} {_reason(resp.status)}\r\n".encode())
    for name, value in resp.headers.items():
        out.append(f"{name}: {value}\r\n".encode())
    out.append(b"\r\n")
    if resp.body:
        out.append(resp.body)
        out.append(b"\r\n")


def write_batch_response(items: list[PartResponse | list[PartResponse]]) -> tuple[str, bytes]:
    """Serialise responses (a list = a committed change set); returns (content type, body)."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    out: list[bytes] = []
    for item in items:
        if isinstance(item, list):
            cs = f"changesetresponse_{uuid.uuid4()}"
            out.append(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n".encode())
            for resp in item:
                _write_part(out, cs, resp)
            out.append(f"--{cs}--\r\n".encode())
        else:
            _write_part(out, boundary, item)
    out.append(f"--{boundary}--\r\n".encode())
    return f"multipart/mixed; boundary={boundary}", b"".join(out)


def parse_batch_response(content_type: str, body: bytes) -> list[PartResponse | list[PartResponse]]:
    """Parse a batch *response* (for tests and clients of the sandbox)."""
    result: list[PartResponse | list[PartResponse]] = []

    def one(mime: dict[str, str], content: bytes) -> PartResponse:
        head, payload = _head_and_body(content.lstrip(b"\n"))
        lines = head.decode().split("\n")
        status = int(lines[0].split()[1])
        return PartResponse(status, _headers("\n".join(lines[1:]).encode()), payload.strip(), mime.get("content-id"))

    for part in _split(body, boundary_of(content_type)):
        head, content = _head_and_body(part)
        mime = _headers(head)
        if mime.get("content-type", "").lower().startswith("multipart/mixed"):
            inner_items = []
            for inner in _split(content, boundary_of(mime["content-type"])):
                ih, ic = _head_and_body(inner)
                inner_items.append(one(_headers(ih), ic))
            result.append(inner_items)
        else:
            result.append(one(mime, content))
    return result
