"""llm-gateway: an OpenAI-compatible gateway in front of supervised llama-server slots and remote upstreams."""
