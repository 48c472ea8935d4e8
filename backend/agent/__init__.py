"""The model side of a turn: the LiteLLM or offline model, the agent, and the MCP client for task tools."""
