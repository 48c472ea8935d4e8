"""What a turn and a conversation do, independent of the protocol that asked (REST, SSE, ChatKit, AI SDK)."""
