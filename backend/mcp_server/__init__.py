"""The MCP task server: five task tools over streamable HTTP, scoped to the delegated user."""

from backend.mcp_server.app import create_mcp_app

__all__ = ["create_mcp_app"]
