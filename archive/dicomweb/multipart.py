"""multipart/related bodies (RFC 2387) as PS3.18 8.6.1.2 uses them: build and parse."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


def new_boundary() -> str:
    """A boundary that cannot occur by chance in a part."""
    return "pacs-triage-" + secrets.token_hex(16)


def content_type(part_type: str, boundary: str) -> str:
    """The Content-Type of a multipart/related message whose parts are `part_type`."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def stream_parts(
    parts: Iterable[tuple[str, bytes | Path, dict[str, str]]], boundary: str
) -> Iterator[bytes]:
    """Yield the body: each part is (Content-Type, bytes or a file to stream, extra headers)."""
    for media_type, payload, headers in parts:
        head = f"--{boundary}\r\nContent-Type: {media_type}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        yield (head + "\r\n").encode()
        if isinstance(payload, Path):
            with payload.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
        else:
            yield payload
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


@dataclass(frozen=True)
class Part:
    """One part of a received multipart message."""

    headers: dict[str, str]
    body: bytes

    @property
    def media_type(self) -> str:
        """The part's media type without parameters, lower case (default application/dicom)."""
        value = self.headers.get("content-type", "application/dicom")
        return value.split(";", 1)[0].strip().lower()


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type or Accept value as (media type, parameters); names lower case."""
    pieces = [p.strip() for p in value.split(";")]
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, _, param = piece.partition("=")
        if name:
            params[name.strip().lower()] = param.strip().strip('"')
    return pieces[0].lower(), params


def split_parts(body: bytes, boundary: str) -> list[Part]:
    """The parts of a multipart/related body.

    Raises
    ------
    ValueError
        If the body holds no part delimited by `boundary`.
    """
    marker = b"--" + boundary.encode()
    if marker not in body:
        raise ValueError("the body contains no part with the declared boundary")
    pieces = body.split(marker)
    parts: list[Part] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # close delimiter
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part has no header/body separator")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, content))
    if not parts:
        raise ValueError("the body contains no part")
    return parts
