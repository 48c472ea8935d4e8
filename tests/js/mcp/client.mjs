// Drive our MCP server with the real TypeScript MCP SDK, the way MCP Inspector and Node agents do.
// Usage: node client.mjs <mcp-url> <good-token> <bad-token>; prints one JSON object for
// tests/test_mcp_server.py (test_typescript_sdk_client).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { extractWWWAuthenticateParams } from "@modelcontextprotocol/sdk/client/auth.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, goodToken, badToken] = process.argv.slice(2);

// Every request the SDK makes, and what it reads from a 401 (it would start OAuth discovery from it).
const requests = [];
const unauthorized = [];
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  requests.push({ method: init?.method ?? "GET", url: String(input), status: response.status });
  if (response.status === 401) {
    const { resourceMetadataUrl, scope, error } = extractWWWAuthenticateParams(response);
    unauthorized.push({
      wwwAuthenticate: response.headers.get("www-authenticate"),
      resourceMetadataUrl: resourceMetadataUrl ? String(resourceMetadataUrl) : null,
      scope: scope ?? null,
      error: error ?? null,
      body: await response.clone().json(),
    });
  }
  return response;
}

function connect(token) {
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
    fetch: recordingFetch,
  });
  const client = new Client({ name: "chat-backend-ts-test", version: "1.0.0" });
  return { client, connected: client.connect(transport) };
}

const out = {};

const good = connect(goodToken);
await good.connected;
out.serverVersion = good.client.getServerVersion();
out.tools = (await good.client.listTools()).tools;
out.added = await good.client.callTool({ name: "add_task", arguments: { title: "from TypeScript" } });
out.second = await good.client.callTool({ name: "add_task", arguments: { title: "and another" } });
out.listed = await good.client.callTool({ name: "list_tasks", arguments: {} });
out.extra = await good.client.callTool({ name: "list_tasks", arguments: { user_id: "someone-else" } });
await good.client.close();

const bad = connect(badToken);
try {
  await bad.connected;
  out.badToken = { connected: true };
} catch (error) {
  out.badToken = { connected: false, name: error?.constructor?.name, code: error?.code ?? null, message: String(error?.message) };
}

out.requests = requests;
out.unauthorized = unauthorized;
process.stdout.write(JSON.stringify(out));
