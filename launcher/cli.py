"""`shuangjian`: run, migrate and seed the whole system.

shuangjian up                 everything on this machine, with demo data
shuangjian serve <service>    one service (what a container runs)
shuangjian migrate [service]  Alembic upgrade (one-shot step in production)
shuangjian demo               load the demo data into identity
shuangjian token -u USER      log in and print an access token
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from chassis.config import DOMAIN_SERVICES, SERVICE_PORTS, platform_settings, service_settings

ALL_SERVICES = (*DOMAIN_SERVICES, "gateway")


def _migrations_dir(name: str) -> Path:
    if name == "gateway":
        from gateway.app import MIGRATIONS_DIR

        return MIGRATIONS_DIR
    module = importlib.import_module(f"services.{name}.app")
    return Path(module.SPEC.migrations_dir)


def _database_url(name: str) -> str:
    platform = platform_settings()
    if name == "gateway":
        from gateway.config import GatewaySettings

        return GatewaySettings().resolved_database_url(platform)
    return service_settings(name).resolved_database_url(platform)


def migrate(names: list[str]) -> None:
    from chassis.migrations import upgrade

    for name in names:
        upgrade(_migrations_dir(name), _database_url(name))
        print(f"migrated {name}")


def serve(name: str, host: str | None, port: int | None) -> None:
    import uvicorn

    # One app per process: freeze its start-up heap out of the collector.
    os.environ.setdefault("GC_FREEZE", "true")
    platform_settings.cache_clear()

    if name == "gateway":
        from gateway.app import create_app as create_gateway
        from gateway.config import GatewaySettings

        gw = GatewaySettings()
        app = create_gateway(gw)
        host, port = host or gw.host, port or gw.port
        if os.environ.get("GATEWAY_SERVER", "fast") != "uvicorn":
            # Its own HTTP server (gateway/server.py): measured cheaper per
            # forwarded request than uvicorn; GATEWAY_SERVER=uvicorn for uvicorn.
            from gateway.server import run as run_gateway

            run_gateway(app, host, port)
            return
    else:
        module = importlib.import_module(f"services.{name}.app")
        settings = service_settings(name)
        app = module.create_app()
        host, port = host or settings.host, port or settings.port
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        # The gateway decides whose X-Forwarded-For to believe (its
        # trusted_proxies); uvicorn must not rewrite the peer before it does.
        proxy_headers=False,
    )


def _wait_ready(url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def up() -> int:
    from launcher.nats_server import EmbeddedNats

    platform = platform_settings()
    platform.var_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    nats: EmbeddedNats | None = None
    if "NATS_URL" not in os.environ:
        nats = EmbeddedNats(platform.var_dir / "nats").start()
        env["NATS_URL"] = nats.url
        os.environ["NATS_URL"] = nats.url
        print(f"嵌入式 NATS JetStream：{nats.url}（数据在 {nats.store_dir}）")
    ports = {n: int(env.get(f"{n.upper()}_PORT", SERVICE_PORTS[n])) for n in ALL_SERVICES}
    for name in DOMAIN_SERVICES:
        env.setdefault(f"GATEWAY_UPSTREAM_{name.upper()}", f"http://127.0.0.1:{ports[name]}")
    env.setdefault("AUTH_JWKS_URL", f"http://127.0.0.1:{ports['identity']}/.well-known/jwks.json")
    os.environ.update(env)
    platform_settings.cache_clear()
    migrate(list(ALL_SERVICES))
    from launcher.demo import load_demo

    # Before identity starts: its relay drains these rows, in order, before
    # it publishes anything new.
    asyncio.run(load_demo())
    env.setdefault("LOG_LEVEL", "WARNING")
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for name in ALL_SERVICES:
            child_env = {**env, f"{name.upper()}_RUN_MIGRATIONS": "false"}
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "launcher.cli", "serve", name],
                    env=child_env,
                    # Own session: Ctrl-C reaches only `up`, which stops children in order.
                    start_new_session=True,
                )
            )
        for name in ALL_SERVICES:
            if not _wait_ready(f"http://127.0.0.1:{ports[name]}/healthz"):
                print(f"{name} 未能启动", file=sys.stderr)
                return 1
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        print(
            "\n双减治理平台已启动。\n"
            f"  网关：        {gateway}/api/v1/<service>/...\n"
            f"  健康检查：    {gateway}/readyz\n"
            f"  接口文档：    {gateway}/docs（合并）  事件文档：{gateway}/asyncapi\n"
            + "".join(f"  {n:<13} http://127.0.0.1:{ports[n]}/docs\n" for n in DOMAIN_SERVICES)
            + "  演示账号见 README（密码 demo-2026!）。按 Ctrl-C 停止。\n",
            flush=True,
        )
        while not stopping:
            if any(c.poll() is not None for c in children):
                print("有服务意外退出，正在停止全部服务。", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        if nats is not None:
            nats.stop()
        print("已停止。")


def token(username: str, password: str, base: str) -> int:
    response = httpx.post(
        f"{base}/api/v1/identity/oauth/token",
        data={"grant_type": "password", "username": username, "password": password},
    )
    if response.status_code != 200:
        print(response.text, file=sys.stderr)
        return 1
    print(response.json()["access_token"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shuangjian", description="双减治理平台")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="启动全部服务并载入演示数据")
    p_serve = sub.add_parser("serve", help="运行一个服务")
    p_serve.add_argument("service", choices=ALL_SERVICES)
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_migrate = sub.add_parser("migrate", help="执行数据库迁移")
    p_migrate.add_argument("service", nargs="*", choices=[*ALL_SERVICES, []])
    sub.add_parser("demo", help="载入演示数据（可重复执行）")
    p_token = sub.add_parser("token", help="登录并打印访问令牌")
    p_token.add_argument("-u", "--username", required=True)
    p_token.add_argument("-p", "--password", default="demo-2026!")
    p_token.add_argument("--gateway", default=f"http://127.0.0.1:{SERVICE_PORTS['gateway']}")
    args = parser.parse_args(argv)

    if args.command == "up":
        return up()
    if args.command == "serve":
        serve(args.service, args.host, args.port)
        return 0
    if args.command == "migrate":
        migrate(args.service or list(ALL_SERVICES))
        return 0
    if args.command == "demo":
        from launcher.demo import load_demo

        migrate(["identity"])
        asyncio.run(load_demo())
        return 0
    if args.command == "token":
        return token(args.username, args.password, args.gateway)
    return 2


if __name__ == "__main__":
    sys.exit(main())
