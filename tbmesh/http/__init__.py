"""The HTTP APIs: OpenAI, Anthropic and Ollama dialects over one server."""
