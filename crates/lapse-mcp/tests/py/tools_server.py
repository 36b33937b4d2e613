"""An MCP server with a few tools, built with the real Python MCP SDK (mcp 2.x).

Usage: tools_server.py stdio | tools_server.py http PORT

`whoami` answers what reached this server of the caller's credentials: the HTTP
headers it received (HTTP) and whether a Lapse token is in its environment (stdio),
so a test can prove the agent's token never reaches an upstream.
"""

import json
import os
import sys

from mcp.server.mcpserver import Context, MCPServer

mcp = MCPServer("lapse-test-tools")


@mcp.tool()
def read_file(path: str) -> str:
    """Read a file."""
    return f"contents of {path}"


@mcp.tool()
def query(table: str, limit: int) -> str:
    """Query a table."""
    return f"{limit} rows from {table}"


@mcp.tool()
def transfer(amount: float, to: str) -> str:
    """Transfer money."""
    return f"sent {amount} to {to}"


@mcp.tool()
def delete_all() -> str:
    """Delete everything (no task should ever see this)."""
    return "deleted everything"


@mcp.tool()
def whoami(ctx: Context) -> str:
    """What of the caller's credentials reached this server."""
    h = ctx.headers
    return json.dumps(
        {
            "headers": None if h is None else {k.lower(): v for k, v in dict(h).items()},
            "env_token": os.environ.get("LAPSE_ACCESS_TOKEN"),
        }
    )


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        mcp.run("stdio")
    else:
        import uvicorn

        app = mcp.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
