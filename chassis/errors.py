"""RFC 9457 problem details for every error a service can answer.

`detail` is zh-CN for the people reading it; `rule` names the policy rule that
refused (REQUIREMENTS.md); `errors` lists field problems; extension members
(e.g. `limit`, `used`) carry the numbers behind a refusal.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://shuangjian.example/problems/"

log = structlog.get_logger("errors")

TITLES: dict[int, str] = {
    400: "请求有误",
    401: "未认证",
    403: "无权访问",
    404: "资源不存在",
    405: "方法不允许",
    409: "状态冲突",
    413: "请求体过大",
    415: "不支持的媒体类型",
    422: "请求未通过校验",
    429: "请求过于频繁",
    500: "服务器内部错误",
    502: "上游服务不可用",
    503: "服务暂不可用",
    504: "上游服务超时",
}
DEFAULT_DETAILS: dict[int, str] = {
    400: "请求格式不正确。",
    401: "缺少或无效的访问令牌。",
    403: "您无权执行此操作。",
    404: "请求的资源不存在。",
    405: "该资源不支持此请求方法。",
    409: "请求与资源当前状态冲突。",
    413: "请求体过大。",
    415: "不支持的请求媒体类型。",
    422: "请求数据未通过校验。",
    429: "请求过于频繁，请稍后再试。",
    500: "服务器内部错误，请稍后再试。",
    503: "服务暂不可用，请稍后再试。",
}
SLUGS: dict[int, str] = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    429: "too-many-requests",
    500: "internal-error",
    502: "bad-gateway",
    503: "unavailable",
    504: "gateway-timeout",
}


class FieldError(BaseModel):
    field: str = Field(description="出错字段的位置，如 body.grade")
    message: str = Field(description="错误说明")
    type: str = Field(default="value_error", description="错误类型")


class ProblemDetail(BaseModel):
    """RFC 9457 问题详情。"""

    type: str = Field(description="问题类型 URI")
    title: str = Field(description="问题类型的简短标题")
    status: int = Field(description="HTTP 状态码")
    detail: str = Field(description="面向用户的中文说明")
    instance: str | None = Field(default=None, description="出错的请求路径")
    rule: str | None = Field(default=None, description="拒绝请求的政策规则编号，如 HW-02")
    errors: list[FieldError] | None = Field(default=None, description="字段级错误")
    request_id: str | None = Field(default=None, description="请求编号，便于追踪")

    model_config = {"extra": "allow"}


RESERVED_MEMBERS = frozenset(
    {"type", "title", "status", "detail", "instance", "rule", "errors", "request_id"}
)


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        /,
        *,
        rule: str | None = None,
        errors: list[FieldError] | None = None,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or DEFAULT_DETAILS.get(status, ""))
        self.status = status
        self.detail = detail or DEFAULT_DETAILS.get(status, TITLES.get(status, "错误"))
        self.rule = rule
        self.errors = errors
        self.slug = slug or (f"rule/{rule}" if rule else SLUGS.get(status, "error"))
        self.title = title or TITLES.get(status, "错误")
        self.headers = headers
        # An extension may not replace a standard member: `conflict(..., status="paid")`
        # means the resource's status, so it is kept as `resource_status`.
        self.extensions = {
            (f"resource_{k}" if k in RESERVED_MEMBERS else k): v for k, v in extensions.items()
        }


def rule_violation(rule: str, detail: str, *, status: int = 422, **extensions: Any) -> Problem:
    """A refusal by a policy rule; `detail` says why in zh-CN."""
    return Problem(status, detail, rule=rule, **extensions)


def not_found(detail: str = "请求的资源不存在。") -> Problem:
    # GW-03: someone else's object is answered exactly like a missing one.
    return Problem(404, detail)


def forbidden(detail: str = "您无权执行此操作。") -> Problem:
    return Problem(403, detail)


def conflict(detail: str, **extensions: Any) -> Problem:
    return Problem(409, detail, **extensions)


def url_path(request: Request) -> str:
    """``request.url.path`` without building the URL (host, query and all) —
    it was a few per cent of a busy route's CPU, paid twice: the problem's
    ``instance`` and the Idempotency-Key's fingerprint."""
    return request.scope["path"].replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


def problem_body(request: Request | None, problem: Problem) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + problem.slug,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if request is not None:
        body["instance"] = url_path(request)
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            body["request_id"] = request_id
    if problem.rule:
        body["rule"] = problem.rule
    if problem.errors:
        body["errors"] = [e.model_dump() for e in problem.errors]
    for key, value in problem.extensions.items():
        body.setdefault(key, value)
    return body


def problem_response(request: Request | None, problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem_body(request, problem),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


_VALIDATION_MESSAGES = {
    "missing": "缺少必填字段",
    "extra_forbidden": "不允许的字段",
    "json_invalid": "JSON 格式错误",
    "string_too_short": "文本过短",
    "string_too_long": "文本过长",
    "int_parsing": "应为整数",
    "float_parsing": "应为数字",
    "bool_parsing": "应为布尔值",
    "date_parsing": "日期格式错误（应为 YYYY-MM-DD）",
    "date_from_datetime_parsing": "日期格式错误（应为 YYYY-MM-DD）",
    "datetime_parsing": "时间格式错误（应为 ISO 8601）",
    "datetime_from_date_parsing": "时间格式错误（应为 ISO 8601）",
    "time_parsing": "时刻格式错误（应为 HH:MM）",
    "uuid_parsing": "应为 UUID",
    "enum": "取值不在允许范围内",
    "literal_error": "取值不在允许范围内",
    "greater_than": "数值过小",
    "greater_than_equal": "数值过小",
    "less_than": "数值过大",
    "less_than_equal": "数值过大",
    "string_pattern_mismatch": "格式不正确",
    "model_attributes_type": "应为对象",
    "dict_type": "应为对象",
    "list_type": "应为列表",
    "too_short": "条目过少",
    "too_long": "条目过多",
    "value_error": "取值无效",
}


def field_errors_from_validation(exc_errors: Any) -> list[FieldError]:
    result = []
    for err in exc_errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        kind = err.get("type", "value_error")
        zh = _VALIDATION_MESSAGES.get(kind)
        raw = str(err.get("msg", ""))
        if kind == "value_error" and raw.startswith("Value error, "):
            message = raw.removeprefix("Value error, ")
        else:
            message = f"{zh}（{raw}）" if zh else raw
        result.append(FieldError(field=loc, message=message, type=kind))
    return result


async def _problem_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(request, exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors_from_validation(exc.errors())
    return problem_response(
        request, Problem(422, "请求数据未通过校验，请检查标出的字段。", errors=errors)
    )


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) and _is_chinese(exc.detail) else None
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(request, Problem(status, detail, headers=headers))


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    # The stack trace goes to the log, never to the client.
    log.exception("unhandled_error", path=request.url.path, error=type(exc).__name__)
    # This handler runs outside the request-context middleware: echo the id here.
    request_id = getattr(request.state, "request_id", None)
    headers = {"x-request-id": request_id} if request_id else None
    return problem_response(request, Problem(500, headers=headers))


async def _integrity_handler(request: Request, exc: Exception) -> JSONResponse:
    # A uniqueness or foreign-key race lost to a concurrent writer: the
    # transaction rolled back whole, so the client may simply retry.
    log.info("integrity_conflict", path=request.url.path, error=str(exc.args[0])[:200])
    return problem_response(
        request,
        Problem(409, "与已有数据冲突（可能有同时提交的请求），未作任何修改，请刷新后重试。"),
    )


async def _pool_timeout_handler(request: Request, exc: Exception) -> JSONResponse:
    # Every database connection is busy (a rush): shed load, do not fail.
    log.warning("database_pool_exhausted", path=request.url.path)
    return problem_response(
        request,
        Problem(503, "系统繁忙，请稍后重试。", headers={"Retry-After": "1"}),
    )


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(IntegrityError, _integrity_handler)
    app.add_exception_handler(PoolTimeout, _pool_timeout_handler)
    app.add_exception_handler(Exception, _unhandled_handler)


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": ProblemDetail,
        "description": TITLES[status],
        "content": {PROBLEM_MEDIA_TYPE: {}},
    }
    for status in (400, 401, 403, 404, 409, 422, 429, 500)
}
