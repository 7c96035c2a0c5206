"""Fixtures for the institutions tests: the service, tokens per role, helpers."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from services.institutions.rules import complete_credit_code
from tests.support import auth

REGION = "jinhua"
_seq = itertools.count(1)


def credit_code(n: int | None = None) -> str:
    """A valid unified social credit code (both check characters computed)."""
    n = next(_seq) if n is None else n
    return complete_credit_code(f"52330702MJ{n:06d}")


def application(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "星河体育培训中心",
        "credit_code": credit_code(),
        "region_id": REGION,
        "district": "婺城区",
        "legal_representative": "王建国",
        "contact_phone": "13800000001",
        "registered_address": "金华市婺城区八一北街 1 号",
        "training_addresses": ["金华市婺城区八一北街 1 号二楼"],
        "category": "sports",
        "target_groups": ["compulsory"],
        "profit_status": "for_profit",
        "modes": ["offline"],
    }
    body.update(overrides)
    return body


DEPARTMENT_OF = {
    "subject": "education",
    "sports": "sports",
    "arts": "culture",
    "science_tech": "science",
}


class Tokens:
    def __init__(self, mint: Any) -> None:
        self.mint = mint

    def regulator(self, department: str, region: str = REGION) -> str:
        return self.mint(
            "regulator",
            tenants=[f"region:{region}", f"department:{department}"],
            subject=f"reg-{department}-{region}",
        )

    def regulator_for(self, category: str, region: str = REGION) -> str:
        return self.regulator(DEPARTMENT_OF[category], region)

    def institution(self, institution_id: str) -> str:
        return self.mint(
            "institution",
            tenants=[f"institution:{institution_id}"],
            subject=f"org-{institution_id}",
        )

    def bureau(self, region: str = REGION) -> str:
        return self.mint("bureau", tenants=[f"region:{region}"], subject=f"bureau-{region}")


@pytest.fixture
def tokens(mint: Any) -> Tokens:
    return Tokens(mint)


@pytest.fixture
async def inst(start_service: Any) -> Any:
    return await start_service("institutions")


async def register(client: Any, tokens: Tokens, institution_id: str, **overrides: Any) -> dict:
    body = application(**overrides)
    r = await client.post(
        "/institutions", json=body, headers=auth(tokens.institution(institution_id))
    )
    assert r.status_code == 201, r.text
    return r.json()


async def act(
    client: Any,
    token: str,
    institution_id: str,
    action: str,
    reason: str = "依法办理",
    **extra: Any,
) -> Any:
    return await client.post(
        f"/institutions/{institution_id}/transitions",
        json={"action": action, "reason": reason, **extra},
        headers=auth(token),
    )


async def licensed(client: Any, tokens: Tokens, institution_id: str, **overrides: Any) -> dict:
    """Register and license an institution (applied -> under_review -> licensed)."""
    body = await register(client, tokens, institution_id, **overrides)
    reg = tokens.regulator_for(body["category"], body["region_id"])
    for action in ("start_review", "grant"):
        r = await act(client, reg, institution_id, action)
        assert r.status_code == 200, r.text
    return r.json()
