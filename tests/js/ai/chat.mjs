// The AI SDK's own chat logic (AbstractChat: what useChat runs, minus React) with the stock
// DefaultChatTransport, against POST /api/chat/ui. Prints what the client ended up with, as JSON,
// for tests/test_ai_sdk.py to judge.
//
// usage: node chat.mjs BASE_URL TOKEN CHAT_ID
import { AbstractChat, DefaultChatTransport } from "ai";

const [base, token, chatId] = process.argv.slice(2);

// useChat keeps messages in React state; this keeps them in memory, the same way.
class MemoryState {
  constructor() {
    this.messages = [];
    this.status = "ready";
    this.error = undefined;
  }
  pushMessage = (message) => {
    this.messages = this.messages.concat(message);
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
  };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  };
  snapshot = (thing) => structuredClone(thing);
}

class NodeChat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new MemoryState() });
  }
}

// What useChat({ transport: new DefaultChatTransport({ api, headers }) }) builds.
function chat(id, headers) {
  const errors = [];
  const finishes = [];
  const c = new NodeChat({
    id,
    transport: new DefaultChatTransport({ api: `${base}/api/chat/ui`, headers }),
    onError: (error) => errors.push(error.message),
    onFinish: ({ message, isError }) => finishes.push({ id: message.id, isError }),
  });
  return { c, errors, finishes };
}

function snapshot({ c, errors, finishes }) {
  return { status: c.status, errors: [...errors], finishes: [...finishes], messages: structuredClone(c.messages) };
}

const out = {};
const alice = chat(chatId, { Authorization: `Bearer ${token}` });

await alice.c.sendMessage({ text: "add buy milk" });
out.first = snapshot(alice);

await alice.c.sendMessage({ text: "show my tasks" });
out.second = snapshot(alice);

// Another answer to the last message: the client drops its answer and asks again.
const before = alice.c.messages.at(-1).id;
await alice.c.regenerate();
out.regenerated = { ...snapshot(alice), replaced: before };

// No token: the transport surfaces the 401 body as the chat's error.
const nobody = chat(`${chatId}-anonymous`, {});
await nobody.c.sendMessage({ text: "add nothing" });
out.unauthorized = snapshot(nobody);

console.log(JSON.stringify(out));
