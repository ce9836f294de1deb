"""HTTP details of the openai backend: credentials out of URLs, URLs safe to show, and `Retry-After`."""

from __future__ import annotations

import base64
import email.utils
import time
import urllib.parse


def retry_after_seconds(headers) -> float | None:
    """Seconds a response asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    try:
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(URL without user:password@, headers carrying them as HTTP Basic auth).

    httpx turns a URL's user:password@ into Basic auth by itself, but it also logs the URL with them (with
    --debug), so they are taken out of the URL and sent as the same header instead.

    >>> split_credentials("http://u:p%40ss@host:8000/v1")
    ('http://host:8000/v1', {'Authorization': 'Basic dTpwQHNz'})
    """
    parts = urllib.parse.urlsplit(url)
    if not (parts.username or parts.password):
        return url, {}
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {"Authorization": f"Basic {token}"}


def display_url(url: str) -> str:
    """The URL without user:password@, safe for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
