"""One HTTP(S) GET that cannot hang, crash or retry forever: the network half of `download`.

`fetch(url, config)` returns the body or raises `FetchError(cause)`, never anything else for a bad URL
or a hostile server:

* the URL is percent-encoded as the official PixMo downloader (requests) sends it: spaces, non-ASCII
  characters (as UTF-8) and anything else outside RFC 3986 in the path and query; existing %XX escapes
  are kept, a stray "%" becomes %25; the host goes through IDNA. A URL that cannot be sent (bad port,
  host or IPv6 literal, no host) is `bad_url`, never retried;
* one deadline bounds the whole exchange of every attempt: connect, status line, headers, chunk-size
  lines, body, retries and their waits. http.client reads the head line by line, one recv per byte from
  a server that drips them, each well inside any per-read timeout, so every recv re-arms the socket
  timeout to what is left (`_DeadlineReader`);
* 429/5xx, timeouts, resets and truncated bodies are retried with jittered back-off (or the server's
  Retry-After, unless it exceeds the cap); a refused connection or a header that cannot be parsed
  (`bad_header`: e.g. a Content-Length of non-ASCII digits) fails the URL at once;
* bodies are size-capped, and `head_check` can refuse a body from its first bytes without reading more.
"""
import dataclasses
import email.utils
import functools
import http.client
import io
import ipaddress
import random
import re
import socket
import ssl
import time
import urllib.parse
from typing import Callable

REDIRECTS = (301, 302, 303, 307, 308)
RETRY_STATUSES = (429, 500, 502, 503, 504)
# RFC 3986 reserved and unreserved characters (quote() keeps letters, digits and "_.-~" anyway), plus "%"
# so that existing escapes stay as they are: what requests' requote_uri keeps.
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")
HEAD_BYTES = 16  # `head_check` gets at least this much: enough for every image signature


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """Limits of one fetch. `deadline` bounds everything (connect, head, body, retries, waits)."""
    connect_timeout: float = 10.0
    read_timeout: float = 20.0  # longest silence between two reads
    deadline: float = 90.0  # total seconds per URL, so a dripping server cannot hang a worker
    max_bytes: int = 64 * 2**20
    max_redirects: int = 5
    max_attempts: int = 3
    backoff: float = 1.0  # first retry waits about this long, doubling, jittered
    max_backoff: float = 30.0
    max_retry_after: float = 60.0  # a longer Retry-After fails the URL now instead of sleeping
    verify_tls: bool = True
    user_agent: str = "molmo-jax-image-downloader/0.1"

    def __post_init__(self):
        for name in ("connect_timeout", "read_timeout", "deadline", "max_bytes", "max_attempts"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be positive, got {getattr(self, name)!r}")


class FetchError(Exception):
    def __init__(self, cause: str, detail: str = "", retryable: bool = False, retry_after: float | None = None):
        super().__init__(f"{cause}: {detail}")
        self.cause, self.detail, self.retryable, self.retry_after = cause, detail, retryable, retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), None if absent/bad.
    Only ASCII digits count: float() would take "١" and fail on "²", which str.isdigit() lets through."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def encode_url_part(text: str) -> str:
    """Percent-encodes what may not travel in a request line (spaces, non-ASCII as UTF-8, controls);
    existing %XX escapes are kept as they are and a "%" that starts none becomes %25."""
    return urllib.parse.quote(STRAY_PERCENT.sub("%25", text), safe=URL_SAFE)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one GET goes: scheme, ASCII host (IDNA), port or None, and the encoded path?query."""
    scheme: str
    host: str
    port: int | None
    path: str


def parse_url(url: str) -> Target:
    """The request target of `url`; FetchError("bad_url" or "unsupported_scheme") naming the problem."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises for "x:99999" and "x:abc"
        host = parts.hostname
        if parts.scheme not in ("http", "https"):
            raise FetchError("unsupported_scheme", f"scheme {parts.scheme!r} in {url[:200]!r}")
        if not host:
            raise ValueError("no host")
        if ":" in host:  # an IPv6 literal: urlsplit strips the brackets, http.client wants them back
            ipaddress.IPv6Address(host.split("%")[0])
            host = f"[{host}]"
        else:
            host = host.encode("idna").decode("ascii")  # raises for empty or over-long labels
            if not HOST_CHARS.fullmatch(host):
                raise ValueError(f"host {host!r} has characters a host name cannot have")
        path = encode_url_part(parts.path or "/") + ("?" + encode_url_part(parts.query) if parts.query else "")
    except FetchError:
        raise
    except ValueError as e:  # UnicodeError (IDNA, lone surrogates) is a ValueError too
        raise FetchError("bad_url", f"{e} in {url[:200]!r}") from e
    return Target(parts.scheme, host, port, path)


def fetch(url: str, config: FetchConfig, head_check: Callable[[bytes], str | None] | None = None) -> bytes:
    """GET `url`, following redirects, retrying 429/5xx/timeouts/resets; raises FetchError(cause).

    head_check: called once with the first read of a 200 body (at least HEAD_BYTES unless the body is
    shorter); a cause it returns fails the URL there, without reading the rest.
    """
    deadline = time.monotonic() + config.deadline
    for attempt in range(config.max_attempts):
        try:
            return _fetch_once(url, config, deadline, head_check)
        except FetchError as e:
            if e.retry_after is not None and e.retry_after > config.max_retry_after:
                raise FetchError("retry_after_too_long", f"server asks to wait {e.retry_after:.0f}s "
                                 f"(cap {config.max_retry_after:.0f}s)") from e
            if not e.retryable or attempt + 1 == config.max_attempts:
                raise
            wait = e.retry_after if e.retry_after is not None else (
                min(config.backoff * 2**attempt, config.max_backoff) * random.uniform(0.5, 1.0))
            if time.monotonic() + wait >= deadline:
                raise FetchError(e.cause, e.detail + "; no time left in the deadline to retry") from e
            time.sleep(wait)
    raise AssertionError("the last attempt always returns or raises")


def _fetch_once(url: str, config: FetchConfig, deadline: float, head_check) -> bytes:
    seen = {url}
    for _ in range(config.max_redirects + 1):
        status, headers, body = _request(parse_url(url), config, deadline, head_check)
        if status in REDIRECTS and headers.get("location"):
            url = _redirect_url(url, headers["location"])
            if url in seen:
                raise FetchError("too_many_redirects", f"redirect loop back to {url[:200]}")
            seen.add(url)
            continue
        if status in RETRY_STATUSES:
            raise FetchError(f"http_{status}", "", retryable=True,
                             retry_after=parse_retry_after(headers.get("retry-after")))
        if status != 200:
            raise FetchError(f"http_{status}")
        return body
    raise FetchError("too_many_redirects", f"more than {config.max_redirects} redirects")


def _redirect_url(url: str, location: str) -> str:
    try:  # http.client decodes headers as latin-1; servers send UTF-8 locations (as requests assumes)
        location = location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    try:
        return urllib.parse.urljoin(url, location)
    except ValueError as e:
        raise FetchError("bad_url", f"redirect to {location[:200]!r}: {e}") from e


class _DeadlineReader(io.RawIOBase):
    """The socket as http.client reads it, with the timeout of every recv set to the smaller of the
    read timeout and the time left: the deadline then holds for every byte of the response."""

    def __init__(self, sock: socket.socket, read_timeout: float, deadline: float):
        super().__init__()
        # makefile keeps the socket open while the response reads it, as http.client's own reader does
        self.sock, self.raw = sock, sock.makefile("rb", buffering=0)
        self.read_timeout, self.deadline = read_timeout, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline exceeded")
        self.sock.settimeout(min(self.read_timeout, left))
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineSocket:
    """What HTTPResponse gets instead of the socket: it only calls makefile("rb")."""

    def __init__(self, sock: socket.socket, read_timeout: float, deadline: float):
        self.sock, self.read_timeout, self.deadline = sock, read_timeout, deadline

    def makefile(self, mode: str):
        return io.BufferedReader(_DeadlineReader(self.sock, self.read_timeout, self.deadline))


def _deadline_response(sock, *args, read_timeout: float, deadline: float, **kwargs) -> http.client.HTTPResponse:
    return http.client.HTTPResponse(_DeadlineSocket(sock, read_timeout, deadline), *args, **kwargs)


def _content_length(headers: dict) -> int | None:
    """Content-Length as an int, None when absent; FetchError("bad_header") when it is no number: an
    http.client that cannot parse it reads to the end of the stream, and str.isdigit() takes "¹²"."""
    value = headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        raise FetchError("bad_header", f"Content-Length {value[:40]!r} is not a number of bytes")
    return int(value)


def _request(target: Target, config: FetchConfig, deadline: float, head_check) -> tuple[int, dict, bytes]:
    """One GET; returns (status, lower-cased headers, body). The body is read only for status 200."""
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timeout", "deadline exceeded", retryable=True)
        return left

    timeout = min(config.connect_timeout, remaining())
    if target.scheme == "https":
        context = ssl.create_default_context()
        if not config.verify_tls:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(target.host, target.port, context=context, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    conn.response_class = functools.partial(_deadline_response, read_timeout=config.read_timeout,
                                            deadline=deadline)
    try:
        conn.connect()
        conn.sock.settimeout(min(config.read_timeout, remaining()))
        conn.request("GET", target.path, headers={"User-Agent": config.user_agent, "Accept": "image/*,*/*;q=0.8"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.status != 200:
            return response.status, headers, b""
        length = _content_length(headers)
        if length is not None and length > config.max_bytes:
            raise FetchError("too_large", f"Content-Length {length} > {config.max_bytes}")
        chunks, size, checked = [], 0, head_check is None
        while True:
            chunk = response.read1(1 << 16)  # read1: one socket read at a time
            size += len(chunk)
            chunks.append(chunk)
            if not checked and (size >= HEAD_BYTES or not chunk):
                head = b"".join(chunks)
                chunks, checked = [head], True
                if (cause := head_check(head)) is not None:
                    raise FetchError(cause, f"first bytes {head[:40]!r}")
            if not chunk:
                break
            if size > config.max_bytes:
                raise FetchError("too_large", f"body exceeds {config.max_bytes} bytes")
        if length is not None and size < length:
            raise FetchError("truncated", f"got {size} of {length} bytes", retryable=True)
        return response.status, headers, b"".join(chunks)
    except FetchError:
        raise
    except (socket.timeout, TimeoutError) as e:
        raise FetchError("timeout", str(e), retryable=True) from e
    except http.client.IncompleteRead as e:
        raise FetchError("truncated", repr(e), retryable=True) from e
    except ConnectionRefusedError as e:  # nothing listens there: asking again in a second will not help
        raise FetchError("connection_refused", str(e)) from e
    except (OSError, http.client.HTTPException) as e:
        raise FetchError("connection_error", f"{type(e).__name__}: {e}", retryable=True) from e
    finally:
        conn.close()
