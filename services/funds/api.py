"""funds's HTTP routes: parse, authorize, call a use case, shape the reply.

Every money-moving POST takes an ``Idempotency-Key`` (FUND-09) and runs its
use case inside the transaction that also claims the key and remembers the
response; waiting requests share one transaction and one commit (group
commit, ``services/funds/writer.py``). Bank
callbacks are also signed (``X-Bank-Signature: t=<unix>,v1=<hex HMAC-SHA256
of "<t>." + body>``) with the custodian banks' shared secret.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response
from sqlalchemy import Select, bindparam, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis import idempotency
from chassis.app import Ctx
from chassis.auth import CurrentPrincipal, Principal, require_roles
from chassis.db import utcnow
from chassis.errors import PROBLEM_MEDIA_TYPE, Problem, not_found, problem_body
from chassis.messaging import idempotency_table
from chassis.roster import guardian_student_ids
from services.funds import ledger, schemas, service
from services.funds.models import (
    Contract,
    EscrowAccount,
    JournalEntry,
    JournalTransaction,
    Lesson,
    Payout,
    Refund,
    RefundPlan,
    RiskAlert,
    roster,
)
from services.funds.writer import PostingWriter, SetWise

router = APIRouter()
OVERSIGHT = ("bureau", "regulator")
SIGNATURE_HEADER = "X-Bank-Signature"
SIGNATURE_TOLERANCE_SECONDS = 300

Bank = Annotated[Principal, Depends(require_roles("bank"))]
Parent = Annotated[Principal, Depends(require_roles("parent"))]
InstitutionUser = Annotated[Principal, Depends(require_roles("institution"))]
Regulator = Annotated[Principal, Depends(require_roles("bureau", "regulator"))]
Auditor = Annotated[Principal, Depends(require_roles("auditor", "bureau", "regulator"))]
Operator = Annotated[Principal, Depends(require_roles("bureau", "bank"))]


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The bank's signature header value for ``body`` (used by banks and tests)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


async def verify_signature(request: Request, ctx: Any) -> None:
    header = request.headers.get(SIGNATURE_HEADER, "")
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts.get("t", ""))
    except ValueError:
        raise Problem(401, "银行回调缺少有效签名（X-Bank-Signature）。", rule="FUND-09") from None
    if abs(time.time() - timestamp) > SIGNATURE_TOLERANCE_SECONDS:
        raise Problem(401, "银行回调签名已过期。", rule="FUND-09")
    expected = sign(ctx.extras["bank_secret"], timestamp, await request.body())
    if not hmac.compare_digest(expected.encode(), header.encode()):
        raise Problem(401, "银行回调签名无效。", rule="FUND-09")


async def _money(
    ctx: Any,
    request: Request,
    principal: Principal,
    work: Callable[[AsyncSession], Awaitable[Any]],
    status_code: int = 200,
) -> Response:
    """Run a money-moving use case through the posting writer: claim of the
    Idempotency-Key, the use case and its stored reply in one transaction
    shared with the other requests waiting (group commit, services/funds/writer.py)."""
    claim = await idempotency.identify(request, principal)
    writer: PostingWriter = ctx.extras["posting_writer"]
    return await writer.submit(claim, work, status_code)


def _today(as_of: dt.date | None = None) -> dt.date:
    return as_of or service.today_in_china()


# ---------------------------------------------------------------- visibility (GW-03)


def account_filter(principal: Principal) -> Any:
    """Which escrow accounts the caller may see (a SQL condition)."""
    if principal.has_role("auditor"):
        return True
    conditions = []
    if principal.has_role("institution"):
        conditions.append(EscrowAccount.institution_id.in_(principal.tenant_ids("institution")))
    if principal.has_role("bank"):
        conditions.append(EscrowAccount.bank_id.in_(principal.tenant_ids("bank")))
    if principal.has_role(*OVERSIGHT):
        conditions.append(EscrowAccount.region_id.in_(principal.tenant_ids("region")))
    return or_(*conditions) if conditions else False


async def contract_filter(session: AsyncSession, principal: Principal) -> Any:
    if principal.has_role("auditor"):
        return True
    conditions = []
    if principal.has_role("parent") and principal.person_id:
        children = await guardian_student_ids(session, roster, principal.person_id)
        conditions.append(Contract.student_id.in_(sorted(children)))
    if principal.has_role("institution"):
        conditions.append(Contract.institution_id.in_(principal.tenant_ids("institution")))
    if principal.has_role("bank"):
        banks = principal.tenant_ids("bank")
        conditions.append(
            Contract.account_id.in_(
                select(EscrowAccount.id).where(EscrowAccount.bank_id.in_(banks))
            )
        )
    if principal.has_role(*OVERSIGHT):
        conditions.append(Contract.region_id.in_(principal.tenant_ids("region")))
    return or_(*conditions) if conditions else False


async def visible_contract(
    session: AsyncSession, principal: Principal, contract_id: str
) -> Contract:
    contract = await session.scalar(
        select(Contract).where(
            Contract.id == contract_id, await contract_filter(session, principal)
        )
    )
    if contract is None:
        raise not_found("合同不存在。")
    return contract


def refund_filter_for(principal: Principal) -> Any:
    if principal.has_role("auditor"):
        return True
    conditions = []
    if principal.has_role("institution"):
        conditions.append(Refund.institution_id.in_(principal.tenant_ids("institution")))
    if principal.has_role("bank"):
        conditions.append(
            Refund.account_id.in_(
                select(EscrowAccount.id).where(
                    EscrowAccount.bank_id.in_(principal.tenant_ids("bank"))
                )
            )
        )
    if principal.has_role(*OVERSIGHT):
        conditions.append(Refund.region_id.in_(principal.tenant_ids("region")))
    if principal.has_role("parent") and principal.person_id:
        conditions.append(
            Refund.contract_id.in_(
                select(Contract.id).where(Contract.guardian_id == principal.person_id)
            )
        )
    return or_(*conditions) if conditions else False


# ---------------------------------------------------------------- accounts (FUND-01)


@router.post(
    "/accounts",
    status_code=201,
    response_model=schemas.AccountOut,
    tags=["专户"],
    summary="监管银行为已获许可的机构开设资金监管专户（FUND-01）",
)
async def open_account(
    body: schemas.AccountOpen, request: Request, ctx: Ctx, principal: Bank
) -> Response:
    async def work(session: AsyncSession) -> schemas.AccountOut:
        account = await service.open_account(
            session, principal, body.bank_id, body.institution_id, body.account_number
        )
        return schemas.AccountOut.model_validate(account)

    return await _money(ctx, request, principal, work, 201)


@router.post(
    "/accounts/{account_id}/close",
    response_model=schemas.AccountOut,
    tags=["专户"],
    summary="监管银行销户：合同均已结清且各项余额为零（FUND-01）",
)
async def close_account(account_id: str, request: Request, ctx: Ctx, principal: Bank) -> Response:
    async def work(session: AsyncSession) -> schemas.AccountOut:
        account = await service.close_account(session, principal, account_id)
        return schemas.AccountOut.model_validate(account)

    return await _money(ctx, request, principal, work)


async def _balances(session: AsyncSession, account: EscrowAccount) -> schemas.AccountBalance:
    inst = account.institution_id
    contract_ids = select(Contract.id).where(Contract.account_id == account.id)
    ids = list((await session.execute(contract_ids)).scalars())
    codes = [ledger.escrow(c) for c in ids] + [ledger.reserve(c) for c in ids]
    per = [
        ledger.releasable(inst),
        ledger.payout_instructed(inst),
        ledger.paid_out(inst),
        ledger.refunds_paid(inst),
    ]
    bal = await ledger.balances(session, codes + per)
    return schemas.AccountBalance(
        **schemas.AccountOut.model_validate(account).model_dump(),
        escrow_fen=sum(bal[ledger.escrow(c)] for c in ids),
        reserve_fen=sum(bal[ledger.reserve(c)] for c in ids),
        releasable_fen=bal[per[0]],
        payout_instructed_fen=bal[per[1]],
        paid_out_fen=bal[per[2]],
        refunds_paid_fen=bal[per[3]],
    )


@router.get(
    "/accounts", response_model=list[schemas.AccountOut], tags=["专户"], summary="可见的专户"
)
async def list_accounts(ctx: Ctx, principal: CurrentPrincipal) -> list[schemas.AccountOut]:
    async with ctx.db.read() as session:
        rows = await session.scalars(
            select(EscrowAccount).where(account_filter(principal)).order_by(EscrowAccount.id)
        )
        return [schemas.AccountOut.model_validate(a) for a in rows]


@router.get(
    "/accounts/{account_id}",
    response_model=schemas.AccountBalance,
    tags=["专户"],
    summary="专户及其余额（由分录计算）",
)
async def get_account(
    account_id: str, ctx: Ctx, principal: CurrentPrincipal
) -> schemas.AccountBalance:
    async with ctx.db.read() as session:
        account = await session.scalar(
            select(EscrowAccount).where(EscrowAccount.id == account_id, account_filter(principal))
        )
        if account is None:
            raise not_found("专户不存在。")
        return await _balances(session, account)


# ---------------------------------------------------------------- contracts (FUND-02/03)


@router.post(
    "/contracts",
    status_code=201,
    response_model=schemas.ContractOut,
    tags=["合同"],
    summary="家长为本人子女购买已备案课程的课时（FUND-02/03）",
)
async def buy(body: schemas.PurchaseIn, request: Request, ctx: Ctx, principal: Parent) -> Response:
    today = _today()

    async def work(session: AsyncSession) -> schemas.ContractOut:
        contract = await service.purchase(
            session,
            ctx.policies,
            principal,
            service.PurchaseInput(**body.model_dump()),
            today,
        )
        return schemas.ContractOut.model_validate(contract)

    return await _money(ctx, request, principal, work, 201)


@router.get(
    "/contracts", response_model=list[schemas.ContractOut], tags=["合同"], summary="可见的合同"
)
async def list_contracts(
    ctx: Ctx,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[schemas.ContractOut]:
    async with ctx.db.read() as session:
        rows = await session.scalars(
            select(Contract)
            .where(await contract_filter(session, principal))
            .order_by(Contract.created_at, Contract.id)
            .limit(limit)
        )
        return [schemas.ContractOut.model_validate(c) for c in rows]


@router.get(
    "/contracts/{contract_id}", response_model=schemas.ContractOut, tags=["合同"], summary="合同"
)
async def get_contract(
    contract_id: str, ctx: Ctx, principal: CurrentPrincipal
) -> schemas.ContractOut:
    async with ctx.db.read() as session:
        return schemas.ContractOut.model_validate(
            await visible_contract(session, principal, contract_id)
        )


@router.get(
    "/contracts/{contract_id}/document",
    response_class=PlainTextResponse,
    tags=["合同"],
    summary="合同文本（示范文本，FUND-03）",
)
async def contract_document(
    contract_id: str, ctx: Ctx, principal: CurrentPrincipal
) -> PlainTextResponse:
    async with ctx.db.read() as session:
        contract = await visible_contract(session, principal, contract_id)
        return PlainTextResponse(contract.document, media_type="text/plain; charset=utf-8")


@router.get(
    "/contracts/{contract_id}/lessons",
    response_model=list[schemas.LessonOut],
    tags=["课次"],
    summary="合同的课次",
)
async def contract_lessons(
    contract_id: str, ctx: Ctx, principal: CurrentPrincipal
) -> list[schemas.LessonOut]:
    async with ctx.db.read() as session:
        await visible_contract(session, principal, contract_id)
        rows = await session.scalars(
            select(Lesson).where(Lesson.contract_id == contract_id).order_by(Lesson.seq)
        )
        return [schemas.LessonOut.model_validate(row) for row in rows]


# ---------------------------------------------------------------- bank callbacks


@router.post(
    "/bank/payments",
    status_code=201,
    response_model=schemas.PaymentOut,
    tags=["银行"],
    summary="监管银行确认缴费到账（签名回调；此后资金才计入合同专户）",
)
async def bank_payment(
    body: schemas.PaymentIn, request: Request, ctx: Ctx, principal: Bank
) -> Response:
    await verify_signature(request, ctx)

    async def work(session: AsyncSession) -> schemas.PaymentOut:
        for bank_id in sorted(principal.tenant_ids("bank")):
            account = await session.scalar(
                select(EscrowAccount)
                .join(Contract, Contract.account_id == EscrowAccount.id)
                .where(Contract.id == body.contract_id, EscrowAccount.bank_id == bank_id)
            )
            if account is not None:
                payment = await service.confirm_payment(
                    session,
                    ctx.policies,
                    bank_id,
                    service.PaymentInput(**body.model_dump()),
                )
                return schemas.PaymentOut.model_validate(payment)
        raise not_found("合同不存在。")

    return await _money(ctx, request, principal, work, 201)


def _bank_of(principal: Principal, bank_id: str | None) -> str:
    banks = principal.tenant_ids("bank")
    if bank_id is None and len(banks) == 1:
        return next(iter(banks))
    if bank_id is None or bank_id not in banks:
        raise not_found("监管银行不存在。")
    return bank_id


@router.post(
    "/bank/refunds/{refund_id}/execute",
    response_model=schemas.RefundOut,
    tags=["银行"],
    summary="监管银行执行退费，原路退回（签名回调，FUND-06/07）",
)
async def bank_refund(
    refund_id: str, body: schemas.BankExecution, request: Request, ctx: Ctx, principal: Bank
) -> Response:
    await verify_signature(request, ctx)
    today = _today()

    async def work(session: AsyncSession) -> schemas.RefundOut:
        found = await session.get(Refund, refund_id)
        if found is None:
            raise not_found("退费申请不存在。")
        account = await session.get(EscrowAccount, found.account_id)
        if account is None or not principal.has_tenant("bank", account.bank_id):
            raise not_found("退费申请不存在。")
        refund = await service.execute_refund(
            session, ctx.policies, account.bank_id, refund_id, body.bank_ref, today
        )
        return schemas.RefundOut.model_validate(refund)

    return await _money(ctx, request, principal, work)


@router.post(
    "/payouts/batches",
    status_code=201,
    response_model=list[schemas.PayoutOut],
    tags=["结算"],
    summary="将各机构可划付余额批量生成划付指令（FUND-04）",
)
async def payout_batch(
    body: schemas.PayoutBatchIn, request: Request, ctx: Ctx, principal: Bank
) -> Response:
    bank_id = _bank_of(principal, body.bank_id)
    today = _today()

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        payouts = await service.create_payouts(session, ctx.policies, bank_id, today)
        return [schemas.PayoutOut.model_validate(p) for p in payouts]

    return await _money(ctx, request, principal, work, 201)


@router.post(
    "/bank/payouts/{payout_id}/execute",
    response_model=schemas.PayoutOut,
    tags=["银行"],
    summary="监管银行确认划付已执行（签名回调）",
)
async def bank_payout(
    payout_id: str, body: schemas.BankExecution, request: Request, ctx: Ctx, principal: Bank
) -> Response:
    await verify_signature(request, ctx)

    async def work(session: AsyncSession) -> schemas.PayoutOut:
        payout = await session.get(Payout, payout_id)
        if payout is None or not principal.has_tenant("bank", payout.bank_id):
            raise not_found("划付指令不存在。")
        done = await service.execute_payout(session, payout.bank_id, payout_id, body.bank_ref)
        return schemas.PayoutOut.model_validate(done)

    return await _money(ctx, request, principal, work)


@router.get("/payouts", response_model=list[schemas.PayoutOut], tags=["结算"], summary="划付指令")
async def list_payouts(ctx: Ctx, principal: CurrentPrincipal) -> list[schemas.PayoutOut]:
    async with ctx.db.read() as session:
        rows = await session.scalars(
            select(Payout)
            .where(Payout.account_id.in_(select(EscrowAccount.id).where(account_filter(principal))))
            .order_by(Payout.created_at, Payout.id)
        )
        return [schemas.PayoutOut.model_validate(p) for p in rows]


@router.post(
    "/bank/statements",
    status_code=201,
    response_model=schemas.ReconciliationOut,
    tags=["银行"],
    summary="上传银行日对账单（CSV：bank_ref,kind,amount_fen），逐笔对账（FUND-08）",
)
async def upload_statement(
    request: Request,
    ctx: Ctx,
    principal: Bank,
    statement_date: Annotated[dt.date, Query(description="对账日期（北京时间）")],
    bank_id: Annotated[str | None, Query()] = None,
) -> Response:
    bank = _bank_of(principal, bank_id)
    raw = await request.body()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Problem(422, "对账单须为 UTF-8 编码的 CSV。") from None

    async def work(session: AsyncSession) -> schemas.ReconciliationOut:
        rec = await service.reconcile(session, bank, statement_date, text)
        return schemas.ReconciliationOut.model_validate(rec)

    return await _money(ctx, request, principal, work, 201)


# ---------------------------------------------------------------- lessons (FUND-04/05)


@router.post(
    "/contracts/{contract_id}/lessons",
    status_code=201,
    response_model=schemas.LessonOut,
    tags=["课次"],
    summary="机构上报已交付的课次（FUND-04）",
)
async def report_lesson(
    contract_id: str,
    body: schemas.LessonReport,
    request: Request,
    ctx: Ctx,
    principal: InstitutionUser,
) -> Response:
    today = _today()

    async def work(session: AsyncSession) -> schemas.LessonOut:
        lesson = await service.report_lesson(
            session, ctx.policies, principal, contract_id, body.delivered_on, today
        )
        return schemas.LessonOut.model_validate(lesson)

    return await _money(ctx, request, principal, work, 201)


@router.post(
    "/lessons/{lesson_id}/answer",
    response_model=schemas.LessonOut,
    tags=["课次"],
    summary="家长确认课次（一课一消划转）或提出异议（FUND-04/05）",
)
async def answer_lesson(
    lesson_id: str, body: schemas.LessonAnswer, request: Request, ctx: Ctx, principal: Parent
) -> Response:
    today = _today()

    async def work(session: AsyncSession) -> schemas.LessonOut:
        lesson = await service.answer_lesson(
            session,
            ctx.policies,
            principal,
            lesson_id,
            confirm=body.confirm,
            reason=body.reason,
            today=today,
        )
        return schemas.LessonOut.model_validate(lesson)

    setwise = None
    if body.confirm:
        # Parents' confirmations waiting together are answered set-wise.
        setwise = SetWise(
            f"confirm-lesson:{today.isoformat()}",
            (ctx.policies, principal, lesson_id, today),
            _confirm_many,
        )
    claim = await idempotency.identify(request, principal)
    writer: PostingWriter = ctx.extras["posting_writer"]
    return await writer.submit(claim, work, setwise=setwise)


_REMEMBER_MANY = (
    update(idempotency_table)
    .where(
        idempotency_table.c.client == bindparam("b_client"),
        idempotency_table.c.key == bindparam("b_key"),
        idempotency_table.c.status == "in_flight",
        idempotency_table.c.created_at == bindparam("b_claimed_at"),
    )
    .values(
        status="done",
        response_status=bindparam("b_status"),
        response_body=bindparam("b_body"),
        content_type=bindparam("b_type"),
        completed_at=bindparam("b_at"),
    )
)


def dialect_of(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "sqlite"


# ``_REMEMBER_MANY`` in one statement: each column one array parameter.
_REMEMBER_MANY_PG = text(
    f"""
    UPDATE {idempotency_table.name} AS k
    SET status = 'done', response_status = r.s, response_body = r.b, content_type = r.t,
        completed_at = :r_at
    FROM unnest(
        CAST(:r_client AS TEXT[]), CAST(:r_key AS TEXT[]), CAST(:r_claimed AS TIMESTAMPTZ[]),
        CAST(:r_status AS INTEGER[]), CAST(:r_body AS BYTEA[]), CAST(:r_type AS TEXT[]))
        AS r (c, k, at, s, b, t)
    WHERE k.client = r.c AND k.key = r.k AND k.status = 'in_flight' AND k.created_at = r.at
    """
)


async def _claim_many(
    session: AsyncSession, claims: list[idempotency.IdempotentRequest]
) -> set[tuple[str, str]]:
    """Claim every key not yet taken (in flight, as ``claim_in`` does), in
    one statement; the (client, key) pairs this statement claimed. On
    PostgreSQL each column is one array parameter."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    if dialect == "postgresql":
        rows = await session.execute(
            _CLAIM_MANY_PG,
            {
                "c_client": [c.client for c in claims],
                "c_key": [c.key for c in claims],
                "c_fingerprint": [c.fingerprint for c in claims],
                "c_at": [c.claimed_at for c in claims],
            },
        )
        return {(client, key) for client, key in rows.all()}
    insert = sqlite_insert if dialect == "sqlite" else pg_insert
    rows = await session.execute(
        insert(idempotency_table)
        .values(
            [
                {
                    "client": c.client,
                    "key": c.key,
                    "fingerprint": c.fingerprint,
                    "status": "in_flight",
                    "created_at": c.claimed_at,
                }
                for c in claims
            ]
        )
        .on_conflict_do_nothing()
        .returning(idempotency_table.c.client, idempotency_table.c.key)
    )
    return {(client, key) for client, key in rows.all()}


_CLAIM_MANY_PG = text(
    f"""
    INSERT INTO {idempotency_table.name} (client, key, fingerprint, status, created_at)
    SELECT c, k, f, 'in_flight', t FROM unnest(
        CAST(:c_client AS TEXT[]), CAST(:c_key AS TEXT[]), CAST(:c_fingerprint AS TEXT[]),
        CAST(:c_at AS TIMESTAMPTZ[])) AS claims (c, k, f, t)
    ON CONFLICT DO NOTHING
    RETURNING client, key
    """
)


async def _confirm_many(
    session: AsyncSession, items: list[tuple[idempotency.IdempotentRequest, Any]]
) -> list[Response | Problem | None]:
    """Set-wise ``answer_lesson`` (confirm) for a group: claims every key in
    one statement, confirms set-wise (``service.confirm_lessons_each``) and
    stores every reply in one statement; a key already taken is left to the
    ordinary path (None), which replays or refuses it."""
    claimed = await _claim_many(session, [c for c, _ in items])
    fresh: list[int] = []
    seen: set[tuple[str, str]] = set()
    for i, (c, _) in enumerate(items):
        if (c.client, c.key) in claimed and (c.client, c.key) not in seen:
            seen.add((c.client, c.key))
            fresh.append(i)
    replies: list[Response | Problem | None] = [None] * len(items)
    if not fresh:
        return replies
    policies, _, _, today = items[fresh[0]][1]
    answers = await service.confirm_lessons_each(
        session, policies, [(items[i][1][1], items[i][1][2]) for i in fresh], today
    )
    now = utcnow()
    rows = []
    for i, answer in zip(fresh, answers, strict=True):
        if isinstance(answer, Problem):
            status = answer.status
            body = json.dumps(problem_body(None, answer), ensure_ascii=False).encode()
            media = PROBLEM_MEDIA_TYPE
        else:
            status = 200
            body = idempotency.encode(schemas.LessonOut.model_validate(answer))
            media = "application/json"
        claim = items[i][0]
        rows.append(
            {
                "b_client": claim.client,
                "b_key": claim.key,
                "b_claimed_at": claim.claimed_at,
                "b_status": status,
                "b_body": body,
                "b_type": media,
                "b_at": now,
            }
        )
        replies[i] = Response(body, status_code=status, media_type=media)
    if dialect_of(session) == "postgresql":
        await session.execute(
            _REMEMBER_MANY_PG,
            {
                "r_client": [r["b_client"] for r in rows],
                "r_key": [r["b_key"] for r in rows],
                "r_claimed": [r["b_claimed_at"] for r in rows],
                "r_status": [r["b_status"] for r in rows],
                "r_body": [r["b_body"] for r in rows],
                "r_type": [r["b_type"] for r in rows],
                "r_at": now,
            },
        )
    else:
        await session.execute(_REMEMBER_MANY, rows)
    return replies


@router.post(
    "/lessons/{lesson_id}/resolution",
    response_model=schemas.LessonOut,
    tags=["课次"],
    summary="处理课次异议：监管部门裁定，或机构认可未上课、家长撤回异议（FUND-04）",
)
async def resolve_dispute(
    lesson_id: str,
    body: schemas.DisputeResolution,
    request: Request,
    ctx: Ctx,
    principal: CurrentPrincipal,
) -> Response:
    today = _today()

    async def work(session: AsyncSession) -> schemas.LessonOut:
        lesson = await service.resolve_dispute(
            session,
            ctx.policies,
            principal,
            lesson_id,
            delivered=body.delivered,
            note=body.note,
            today=today,
        )
        return schemas.LessonOut.model_validate(lesson)

    return await _money(ctx, request, principal, work)


@router.post(
    "/lessons/confirmations",
    response_model=list[schemas.LessonOut],
    tags=["课次"],
    summary="家长批量确认课次（一次划转多课次，每课次一笔分录，FUND-04）",
)
async def confirm_lessons(
    body: schemas.LessonBatch, request: Request, ctx: Ctx, principal: Parent
) -> Response:
    today = _today()

    async def work(session: AsyncSession) -> schemas.LessonList:
        lessons = await service.answer_lessons(
            session, ctx.policies, principal, body.lesson_ids, today
        )
        return schemas.LessonList.model_validate(lessons)  # one call for the whole list

    return await _money(ctx, request, principal, work)


# ---------------------------------------------------------------- refunds (FUND-06/07)


@router.post(
    "/contracts/{contract_id}/refunds",
    status_code=201,
    response_model=schemas.RefundOut,
    tags=["退费"],
    summary="家长申请退费（金额由系统计算，FUND-06）",
)
async def request_refund(
    contract_id: str, body: schemas.RefundIn, request: Request, ctx: Ctx, principal: Parent
) -> Response:
    today = _today()

    async def work(session: AsyncSession) -> schemas.RefundOut:
        refund = await service.request_refund(
            session, ctx.policies, principal, contract_id, body.reason, today
        )
        return schemas.RefundOut.model_validate(refund)

    return await _money(ctx, request, principal, work, 201)


@router.post(
    "/refunds/{refund_id}/answer",
    response_model=schemas.RefundOut,
    tags=["退费"],
    summary="机构答复退费申请（逾期视为同意）",
)
async def answer_refund(
    refund_id: str, body: schemas.RefundAnswer, ctx: Ctx, principal: InstitutionUser
) -> schemas.RefundOut:
    async with ctx.db.transaction() as session:
        refund = await service.respond_refund(
            session, principal, refund_id, body.agree, body.answer
        )
        return schemas.RefundOut.model_validate(refund)


@router.post(
    "/refunds/{refund_id}/decision",
    response_model=schemas.RefundOut,
    tags=["退费"],
    summary="监管部门裁定机构有异议的退费申请",
)
async def decide_refund(
    refund_id: str, body: schemas.RefundDecision, ctx: Ctx, principal: Regulator
) -> schemas.RefundOut:
    async with ctx.db.transaction() as session:
        refund = await service.decide_refund(
            session, principal, refund_id, body.approve, body.answer
        )
        return schemas.RefundOut.model_validate(refund)


@router.get("/refunds", response_model=list[schemas.RefundOut], tags=["退费"], summary="可见的退费")
async def list_refunds(
    ctx: Ctx, principal: CurrentPrincipal, status: str | None = None
) -> list[schemas.RefundOut]:
    async with ctx.db.read() as session:
        query: Select[Any] = select(Refund).where(refund_filter_for(principal))
        if status:
            query = query.where(Refund.status == status)
        rows = await session.scalars(query.order_by(Refund.requested_at, Refund.id))
        return [schemas.RefundOut.model_validate(r) for r in rows]


@router.get(
    "/refund-plans",
    response_model=list[schemas.PlanOut],
    tags=["退费"],
    summary="冻结退费计划（FUND-07）",
)
async def list_plans(ctx: Ctx, principal: CurrentPrincipal) -> list[schemas.PlanOut]:
    async with ctx.db.read() as session:
        rows = await session.scalars(
            select(RefundPlan)
            .where(
                RefundPlan.account_id.in_(select(EscrowAccount.id).where(account_filter(principal)))
            )
            .order_by(RefundPlan.created_at)
        )
        return [schemas.PlanOut.model_validate(p) for p in rows]


@router.get(
    "/refund-plans/{plan_id}",
    response_model=schemas.PlanProgress,
    tags=["退费"],
    summary="退费计划执行进度：监管部门追踪至零（FUND-07）",
)
async def get_plan(plan_id: str, ctx: Ctx, principal: CurrentPrincipal) -> schemas.PlanProgress:
    async with ctx.db.read() as session:
        plan = await session.scalar(
            select(RefundPlan).where(
                RefundPlan.id == plan_id,
                RefundPlan.account_id.in_(
                    select(EscrowAccount.id).where(account_filter(principal))
                ),
            )
        )
        if plan is None:
            raise not_found("退费计划不存在。")
        refunds = list(
            await session.scalars(
                select(Refund).where(Refund.plan_id == plan.id).order_by(Refund.id)
            )
        )
        paid = sum(r.paid_fen or 0 for r in refunds if r.status == "paid")
        outstanding = sum(r.amount_fen for r in refunds if r.status != "paid")
        return schemas.PlanProgress(
            **schemas.PlanOut.model_validate(plan).model_dump(),
            outstanding_fen=outstanding,
            paid_fen=paid,
            refunds=[schemas.RefundOut.model_validate(r) for r in refunds],
        )


# ---------------------------------------------------------------- operations, risk, audit


@router.post(
    "/ops/sweep",
    response_model=schemas.SweepOut,
    tags=["运维"],
    summary="定时任务：自动确认课次、视为同意退费、逾期退费、补划与风险扫描",
)
async def run_sweep(body: schemas.SweepIn, ctx: Ctx, principal: Operator) -> schemas.SweepOut:
    writer: PostingWriter = ctx.extras["posting_writer"]

    async def work(session: AsyncSession) -> service.SweepResult:
        return await service.sweep(session, ctx.policies, _today(body.as_of))

    result: service.SweepResult = await writer.run(work)
    return schemas.SweepOut(**result.__dict__)


@router.get(
    "/alerts", response_model=list[schemas.AlertOut], tags=["风险"], summary="风险预警（FUND-08）"
)
async def list_alerts(ctx: Ctx, principal: Auditor) -> list[schemas.AlertOut]:
    async with ctx.db.read() as session:
        query: Select[Any] = select(RiskAlert)
        if not principal.has_role("auditor"):
            query = query.where(RiskAlert.region_id.in_(principal.tenant_ids("region")))
        rows = await session.scalars(query.order_by(RiskAlert.created_at))
        return [schemas.AlertOut.model_validate(a) for a in rows]


AuditorOnly = Annotated[Principal, Depends(require_roles("auditor"))]


@router.get(
    "/audit/chain",
    response_model=schemas.ChainOut,
    tags=["审计"],
    summary="校验日记账哈希链，指出第一处断裂（FUND-09）",
)
async def audit_chain(ctx: Ctx, principal: AuditorOnly) -> schemas.ChainOut:
    async with ctx.db.read() as session:
        report = await ledger.verify_chain(session)
        return schemas.ChainOut(**report.__dict__)


@router.get(
    "/audit/trial-balance",
    response_model=schemas.TrialBalanceOut,
    tags=["审计"],
    summary="试算平衡：全部分录合计为零，缓存余额与分录一致（FUND-09）",
)
async def audit_trial_balance(ctx: Ctx, principal: AuditorOnly) -> schemas.TrialBalanceOut:
    async with ctx.db.read() as session:
        tb = await ledger.trial_balance(session)
        return schemas.TrialBalanceOut(
            ok=tb.ok,
            total_fen=tb.total_fen,
            accounts=tb.accounts,
            mismatched=tb.mismatched,
            negative=tb.negative,
        )


@router.get(
    "/audit/journal",
    response_model=list[schemas.TransactionOut],
    tags=["审计"],
    summary="日记账（只读）",
)
async def audit_journal(
    ctx: Ctx,
    principal: AuditorOnly,
    after_seq: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[schemas.TransactionOut]:
    async with ctx.db.read() as session:
        txns = list(
            await session.scalars(
                select(JournalTransaction)
                .where(JournalTransaction.seq > after_seq)
                .order_by(JournalTransaction.seq)
                .limit(limit)
            )
        )
        entries: dict[int, list[schemas.EntryOut]] = {}
        if txns:
            rows = await session.execute(
                select(JournalEntry)
                .where(JournalEntry.seq.in_([t.seq for t in txns]))
                .order_by(JournalEntry.seq, JournalEntry.leg)
            )
            for e in rows.scalars():
                entries.setdefault(e.seq, []).append(
                    schemas.EntryOut(account=e.account, amount_fen=e.amount_fen)
                )
        return [
            schemas.TransactionOut(
                seq=t.seq,
                kind=t.kind,
                ref=t.ref,
                memo=t.memo,
                bank_ref=t.bank_ref,
                posted_at=t.posted_at,
                prev_hash=t.prev_hash,
                hash=t.hash,
                entries=entries.get(t.seq, []),
            )
            for t in txns
        ]


# Routing tries the routes in order: the hot money paths (a parent's lesson
# confirmation, single or batched) first. Their paths overlap no other route's
# methods, so the order changes only how soon they are found.
_HOT_PATHS = ("/lessons/{lesson_id}/answer", "/lessons/confirmations")
router.routes.sort(key=lambda route: getattr(route, "path", "") not in _HOT_PATHS)
