"""HTTP basic auth against bcrypt hashes, priced for a scraper that comes back every 15 seconds.

bcrypt is slow on purpose (about 60 ms at cost 10), so each check runs in a worker thread, one at a time (a flood of
wrong passwords then takes one core, not all of them, and never stalls the event loop), and a success is
remembered under an HMAC of user and password with a key made for this table, never the password itself. A
reload builds a new table, so a rotated password forgets the old one's successes. An unknown user costs one
bcrypt against a dummy hash of the same cost, exactly as a wrong password does, so timing does not tell
which user names exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
from typing import Mapping

import bcrypt

# $2a$, $2b$ or $2y$, a two-digit cost, then 22 characters of salt and 31 of hash in bcrypt's base64 alphabet.
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def is_bcrypt_hash(value: object) -> bool:
    return isinstance(value, str) and BCRYPT_HASH.fullmatch(value) is not None


def basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    """User and password from an `Authorization: Basic …` header; None for anything else or malformed."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class BasicAuthUsers:
    """One loaded `basic_auth_users` table: checks credentials and remembers the ones that passed."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._hashes = {user: hashed.encode("ascii") for user, hashed in hashes.items()}
        cost = max((int(hashed[4:6]) for hashed in hashes.values()), default=10)
        self._dummy = bcrypt.gensalt(rounds=cost) + "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31)).encode()
        self._cache_key = secrets.token_bytes(32)
        self._passed: set[bytes] = set()
        self._one_at_a_time = asyncio.Semaphore(1)
        self.bcrypt_runs = 0  # how many checks cost a bcrypt; tests read it to see the cache work

    def hash_for(self, user: str) -> bytes:
        """The hash a check of this user runs against: the user's own, or the dummy of the same cost."""
        return self._hashes.get(user, self._dummy)

    async def check(self, user: str, password: bytes) -> bool:
        token = self._token(user, password)
        if token in self._passed:
            return True
        async with self._one_at_a_time:
            self.bcrypt_runs += 1
            matched = await asyncio.to_thread(_checkpw, password, self.hash_for(user))
        if matched and user in self._hashes:
            self._passed.add(token)
            return True
        return False

    def _token(self, user: str, password: bytes) -> bytes:
        name = user.encode("utf-8")
        # The user name's length goes first, so ("a", "b:c") and ("a:b", "c") can never share a token.
        return hmac.new(self._cache_key, len(name).to_bytes(4, "big") + name + password, hashlib.sha256).digest()


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt >= 5 refuses passwords over 72 bytes instead of truncating them, as Go does
        return False
