// Two common SSE client libraries, each used as its README shows, against POST /api/chat/stream.
// Prints what each saw, as JSON, for tests/test_sse_clients.py to judge.
//
// usage: node clients.mjs BASE_URL TOKEN
import { fetchEventSource } from "@microsoft/fetch-event-source";
import { createParser } from "eventsource-parser";

const [base, token] = process.argv.slice(2);
const url = `${base}/api/chat/stream`;
const headers = { "Content-Type": "application/json", Authorization: `Bearer ${token}` };

// fetch-event-source is written for browsers: it reads `window` and `document`.
globalThis.window = globalThis;
globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };

async function withFetchEventSource() {
  const seen = { posts: 0, types: [], heartbeats: 0, errors: [], closed: false };
  const ctrl = new AbortController();
  const countingFetch = (input, init) => {
    seen.posts += 1;
    return fetch(input, init);
  };
  await fetchEventSource(url, {
    method: "POST",
    headers,
    body: JSON.stringify({ message: "add buy milk", client_message_id: "fes-1" }),
    signal: ctrl.signal,
    fetch: countingFetch,
    onmessage(ev) {
      const data = JSON.parse(ev.data); // as the README does: a comment here would throw
      if (data.type === "heartbeat") {
        seen.heartbeats += 1;
        return;
      }
      seen.types.push(data.type);
      if (data.type === "complete" || data.type === "error") {
        ctrl.abort(); // done: close, so nothing is sent again
      }
    },
    onclose() {
      seen.closed = true;
    },
    onerror(err) {
      seen.errors.push(String(err));
      throw err; // never retry a turn behind the user's back
    },
  });
  return seen;
}

async function withEventSourceParser() {
  const seen = { posts: 1, types: [], heartbeats: 0, comments: 0, errors: [] };
  const parser = createParser({
    onEvent(event) {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (err) {
        seen.errors.push(String(err));
        return;
      }
      if (data.type === "heartbeat") seen.heartbeats += 1;
      else seen.types.push(data.type);
    },
    onComment() {
      seen.comments += 1;
    },
    onError(err) {
      seen.errors.push(String(err));
    },
  });
  const response = await fetch(url, {
    method: "POST",
    headers,
    body: JSON.stringify({ message: "show my tasks", client_message_id: "esp-1" }),
  });
  seen.status = response.status;
  const decoder = new TextDecoder();
  for await (const chunk of response.body) {
    parser.feed(decoder.decode(chunk, { stream: true }));
  }
  return seen;
}

console.log(
  JSON.stringify({ fetchEventSource: await withFetchEventSource(), eventsourceParser: await withEventSourceParser() }),
);
