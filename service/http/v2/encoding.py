"""Compressed V2 request bodies: ``Content-Encoding: gzip`` or ``deflate``, as tritonclient sends them.

``tritonclient.http``'s ``infer(..., request_compression_algorithm="gzip" | "deflate")`` compresses the
whole body (JSON header and binary tensors; ``Inference-Header-Content-Length`` counts the uncompressed
JSON) with ``gzip.compress`` or ``zlib.compress``, and Triton's server inflates it. The inflated body is
held to the same size limit as an uncompressed one, so a small bomb is a 413, not a worker's memory.
"""

from __future__ import annotations

import zlib

from service.http.v2.errors import V2Error

SUPPORTED = ("identity", "gzip", "deflate")
# zlib's wbits: a gzip member, or a zlib stream (what HTTP's "deflate" is; raw deflate is tried after it)
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_encoding(value: bytes | None) -> str | V2Error:
    """The request's encoding, lowercased, or the 415 that lists what is accepted."""
    encoding = (value or b"identity").decode("latin-1").strip().lower() or "identity"
    if encoding in SUPPORTED:
        return encoding
    return V2Error(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed "
                        f"or as one of: {', '.join(SUPPORTED[1:])}", kind="unsupported_media_type")


def inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """The uncompressed body; 400 for a damaged stream, 413 past ``max_bytes`` (checked while inflating)."""
    if encoding == "identity":
        return body
    try:
        return _inflate(body, _WBITS[encoding], encoding, max_bytes)
    except zlib.error as exc:
        if encoding == "deflate":  # some clients send raw deflate without the zlib wrapper
            try:
                return _inflate(body, -zlib.MAX_WBITS, encoding, max_bytes)
            except zlib.error:
                pass
        raise V2Error(400, f"the body is not valid {encoding} data ({exc}); it is sent with "
                           f"Content-Encoding: {encoding}") from None


def _inflate(body: bytes, wbits: int, encoding: str, max_bytes: int) -> bytes:
    stream = zlib.decompressobj(wbits)
    out = stream.decompress(body, max_bytes + 1)
    if len(out) <= max_bytes:  # all input consumed; flush hands back what zlib still buffers
        out += stream.flush()
    if len(out) > max_bytes:
        raise V2Error(413, f"the request body inflates to more than {max_bytes} bytes "
                           "(IMGCLF_MAX_REQUEST_BYTES); send fewer or smaller images", kind="request_too_large")
    if not stream.eof:
        raise zlib.error("the compressed stream ends early")
    if stream.unused_data:
        raise zlib.error(f"{len(stream.unused_data)} bytes follow the end of the compressed {encoding} stream")
    return out
