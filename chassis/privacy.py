"""Minors' personal data, minimized (X-06).

Identity numbers are stored only as a keyed hash (for matching, e.g. a
trainer against the in-service teacher roster, INST-05) plus a masked form for
display. Phone numbers are masked for every role that does not need them.
"""

from __future__ import annotations

import hashlib
import hmac
import re

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_ID_PATTERN = re.compile(r"^\d{17}[\dX]$")
_PHONE_PATTERN = re.compile(r"^1[3-9]\d{9}$")


def normalize_identity_number(value: str) -> str:
    return value.strip().upper()


def is_valid_resident_id(value: str) -> bool:
    """GB 11643 citizen identity number: 18 characters with a mod-11 check digit."""
    value = normalize_identity_number(value)
    if not _ID_PATTERN.match(value):
        return False
    total = sum(int(d) * w for d, w in zip(value[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == value[17]


def resident_id_check_digit(first17: str) -> str:
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def hash_identity_number(value: str, pepper: str) -> str:
    """Keyed hash shared by every service that must match identity numbers."""
    normalized = normalize_identity_number(value).encode()
    return hmac.new(pepper.encode(), normalized, hashlib.sha256).hexdigest()


def mask_identity_number(value: str) -> str:
    value = normalize_identity_number(value)
    if len(value) < 8:
        return "*" * len(value)
    return value[:3] + "*" * (len(value) - 7) + value[-4:]


def is_valid_mobile(value: str) -> bool:
    return bool(_PHONE_PATTERN.match(value.strip()))


def mask_phone(value: str | None) -> str | None:
    if not value:
        return value
    value = value.strip()
    if len(value) < 7:
        return "*" * len(value)
    return value[:3] + "****" + value[-4:]


def mask_name(value: str) -> str:
    """张三 → 张*, 欧阳娜娜 → 欧**娜 (for public lists)."""
    if len(value) <= 1:
        return value
    if len(value) == 2:
        return value[0] + "*"
    return value[0] + "*" * (len(value) - 2) + value[-1]
