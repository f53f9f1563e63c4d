"""llm-gateway test suite (real llama-server, real models, real SDK clients)."""
