"""ListSessions' page tokens: the last session id of a page, signed so that only this server process,
for the same caller, takes it back (an HMAC with a key made at start). A token is opaque to clients;
a garbled, forged or foreign one is INVALID_ARGUMENT naming page_token."""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from optreg.server.model.errors import InvalidArgument

MAX_PAGE_SIZE = 1000
_MAC = 16  # bytes of HMAC-SHA256 kept
_VERSION = b"\x01"


class PageTokens:
    def __init__(self):
        self._key = secrets.token_bytes(32)  # new at each start: older tokens are refused

    def _mac(self, owner: str, body: bytes) -> bytes:
        return hmac.new(self._key, owner.encode() + b"\0" + body, hashlib.sha256).digest()[:_MAC]

    def issue(self, last_id: str, owner: str) -> str:
        body = _VERSION + last_id.encode()
        return base64.urlsafe_b64encode(self._mac(owner, body) + body).decode().rstrip("=")

    def after(self, token: str, owner: str) -> str:
        """The session id `token` (issued by issue() to `owner`) names; InvalidArgument otherwise."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            mac, body = raw[:_MAC], raw[_MAC:]
            if (len(mac) == _MAC and body[:1] == _VERSION and hmac.compare_digest(mac, self._mac(owner, body))):
                return body[1:].decode()
        except (ValueError, UnicodeError):  # (binascii.Error is a ValueError)
            pass
        raise InvalidArgument("page_token is not one this server issued to this caller since it started "
                              "(a token is only passed back as next_page_token gave it): start the listing "
                              "again with page_token \"\"")


def check_page_size(page_size: int) -> None:
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size {page_size}: give 1 to {MAX_PAGE_SIZE} sessions a page "
                              "(0: every session in one reply)")
