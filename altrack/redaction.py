"""Secrets out of everything altrack prints, logs or tags: URLs carry them (``user:pw@host``,
``?password=...``), in tracking URIs, Optuna storages, command lines and error messages."""

from __future__ import annotations

import re

SECRET_PARAMS = ("password", "passwd", "pass", "pwd", "token", "secret", "key")
MASK = "***"

# the password runs to the *last* @ before the host, so a raw @ inside it does not leak its tail
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/?#@\s]*):(?P<pw>[^/?#\s]*)@")
# any key that is, or ends in, a secret's name: password, access_token, client_secret, api_key, ...
_QUERY = re.compile(r"(?P<key>[?&;][\w.-]*?(?:" + "|".join(SECRET_PARAMS) + r")=)(?P<value>[^&#\s'\"]*)",
                    re.IGNORECASE)  # fmt: skip


def redact(text: str) -> str:
    """``text`` with every URL password and password-like query value replaced by ``***``.

    >>> redact("postgresql://alice:S3cret@db:5432/x?sslmode=require&password=S3cret")
    'postgresql://alice:***@db:5432/x?sslmode=require&password=***'
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
