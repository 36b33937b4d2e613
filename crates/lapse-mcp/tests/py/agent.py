"""An agent using the real Python MCP SDK through `lapse mcp-proxy`.

Usage: agent.py stdio | agent.py http | agent.py http-modern

Reads its setup from the environment (the Rust test provides it) and prints one
JSON line per step: {"step": ..., "ok": bool, "code": int|null, "text": ...}.

stdio: starts the proxy itself as its MCP server (`LAPSE_BIN mcp-proxy --config
PROXY_CONFIG`), once with the parent's token and once with the sub-agent's.
http: talks streamable HTTP to PROXY_URL with a DPoP proof per request, signed with
the Ed25519 key whose 32-byte seed is in PARENT_KEY / CHILD_KEY (hex).
"""

import asyncio
import base64
import hashlib
import json
import os
import sys
import time
import urllib.request
import uuid

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

E = os.environ


def say(step, ok, code=None, text=None):
    print(json.dumps({"step": step, "ok": ok, "code": code, "text": text}), flush=True)


async def call(s, step, name, args):
    try:
        r = await s.call_tool(name, args)
        text = "".join(getattr(c, "text", "") for c in r.content)
        say(step, not r.is_error, None, text)
    except MCPError as e:
        say(step, False, e.code, e.message)


async def list_tools(s, step):
    r = await s.list_tools()
    say(step, True, None, sorted(t.name for t in r.tools))


def revoke(grant):
    req = urllib.request.Request(
        f"{E['BROKER']}/v1/grants/{grant}/revoke",
        data=json.dumps({"reason": "test: task over"}).encode(),
        headers={"Authorization": f"Bearer {E['ADMIN_TOKEN']}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req) as r:
        assert r.status == 200


def settle():
    # The revocation reaches the proxy through the broker's feed (measured p99 a
    # few milliseconds); this is far above that bound.
    time.sleep(0.5)


def stdio_params(token):
    return StdioServerParameters(
        command=E["LAPSE_BIN"],
        args=["mcp-proxy", "--config", E["PROXY_CONFIG"]],
        env={"LAPSE_ACCESS_TOKEN": token, "LAPSE_PROXY_TOKEN": E["LAPSE_PROXY_TOKEN"], "PATH": E["PATH"]},
    )


async def scenario(parent_session, child_session):
    """Both sessions open; the same steps for every transport."""
    p, c = parent_session, child_session
    await list_tools(p, "parent lists")
    await call(p, "declared call", "read_file", {"path": "/data/a.txt"})
    await call(p, "undeclared tool", "delete_all", {})
    await call(p, "outside the prefix", "read_file", {"path": "/etc/passwd"})
    await call(p, "climbing out of the prefix", "read_file", {"path": "/data/../etc/passwd"})
    await call(p, "table not allowed", "query", {"table": "users", "limit": 5})
    await call(p, "within the declared maximum", "transfer", {"amount": 250, "to": "acct-7"})
    await call(p, "policy forbids", "transfer", {"amount": 2000, "to": "acct-7"})
    await call(p, "whoami", "whoami", {})
    await list_tools(c, "child lists")
    await call(c, "child declared call", "read_file", {"path": "/data/reports/q3.csv"})
    await call(c, "child outside its narrower prefix", "read_file", {"path": "/data/other.txt"})
    await call(c, "child calls a tool only its parent has", "query", {"table": "orders", "limit": 5})
    revoke(E["PARENT_GRANT"])
    settle()
    await call(p, "parent after revoke", "read_file", {"path": "/data/a.txt"})
    await call(c, "child after parent revoke", "read_file", {"path": "/data/reports/q3.csv"})


async def run_stdio():
    async with stdio_client(stdio_params(E["PARENT_TOKEN"])) as (pr, pw), ClientSession(pr, pw) as p:
        await p.initialize()
        async with stdio_client(stdio_params(E["CHILD_TOKEN"])) as (cr, cw), ClientSession(cr, cw) as c:
            await c.initialize()
            await scenario(p, c)


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def dpop_auth(token, seed_hex):
    import httpx2
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw)}

    class DPoPAuth(httpx2.Auth):
        def auth_flow(self, request):
            claims = {
                "jti": str(uuid.uuid4()),
                "htm": request.method,
                "htu": str(request.url).split("?")[0],
                "iat": int(time.time()),
                "ath": b64u(hashlib.sha256(token.encode()).digest()),
            }
            request.headers["Authorization"] = f"DPoP {token}"
            request.headers["DPoP"] = jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": "dpop+jwt", "jwk": jwk})
            yield request

    return httpx2.AsyncClient(auth=DPoPAuth(), timeout=httpx2.Timeout(30.0))


async def run_http(modern):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    url = E["PROXY_URL"]
    async with dpop_auth(E["PARENT_TOKEN"], E["PARENT_KEY"]) as ph, dpop_auth(E["CHILD_TOKEN"], E["CHILD_KEY"]) as ch:
        if modern:
            async with Client(streamable_http_client(url, http_client=ph)) as p, Client(
                streamable_http_client(url, http_client=ch)
            ) as c:
                say("protocol", True, None, p.protocol_version)
                await scenario(p, c)
        else:
            async with streamable_http_client(url, http_client=ph) as (pr, pw), ClientSession(pr, pw) as p:
                await p.initialize()
                async with streamable_http_client(url, http_client=ch) as (cr, cw), ClientSession(cr, cw) as c:
                    await c.initialize()
                    await scenario(p, c)
    # Without a token the proxy answers 401 naming its metadata.
    with urllib.request.urlopen(url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")) as r:
        say("protected resource metadata", r.status == 200, None, json.loads(r.read()))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "stdio":
        asyncio.run(run_stdio())
    else:
        asyncio.run(run_http(mode == "http-modern"))
