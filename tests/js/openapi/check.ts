// Type-checked (tsc --noEmit) against the types openapi-typescript generates from the API's OpenAPI
// document (api.d.ts, written next to this file by tests/test_openapi.py).
import type { components, paths } from "./api";

type Schemas = components["schemas"];
type ChatKitBody = NonNullable<paths["/chatkit"]["post"]["requestBody"]>["content"]["application/json"];

// What ChatKit's browser client sends to start a thread.
export const create: ChatKitBody = {
  type: "threads.create",
  params: {
    input: {
      content: [{ type: "input_text", text: "add buy milk" }],
      attachments: [],
      inference_options: {},
    },
  },
};
export const list: ChatKitBody = { type: "items.list", params: { thread_id: "t", order: "asc", limit: 20 } };

// @ts-expect-error threads.create carries params
export const missingParams: ChatKitBody = { type: "threads.create" };
// @ts-expect-error no such request type
export const unknownType: ChatKitBody = { type: "threads.explode", params: {} };

// A failed turn (502): the stored reply's ids, and whether retrying can help.
type Chat502 = paths["/api/chat"]["post"]["responses"][502]["content"]["application/json"];
export const failed: Chat502 = {
  detail: "The model failed",
  code: "model_error",
  retryable: true,
  conversation_id: "2f1c7f0e-8d7a-4d37-9a53-5f6f1f3b2c11",
  message_id: "0b6e0c55-54c7-4d0f-8f55-3c1b9a0f6d42",
};
export const retryable: boolean | null | undefined = failed.retryable;
// @ts-expect-error retryable is a boolean
export const wrongRetryable: Schemas["ErrorBody"] = { detail: "x", code: "y", retryable: "yes" };

// Stream events narrow on `type`.
type StreamEvent = paths["/api/chat/stream"]["post"]["responses"][200]["content"]["text/event-stream"];
export function textOf(event: StreamEvent): string {
  switch (event.type) {
    case "token":
      return event.token;
    case "complete":
      return event.full_content;
    case "error":
      return event.retryable ? `${event.message} (retry)` : event.message;
    default:
      return "";
  }
}

// ChatKit items include the task tool calls.
export function toolName(event: Schemas["ThreadItemDoneEvent"]): string | undefined {
  return event.item.type === "client_tool_call" ? event.item.name : undefined;
}
