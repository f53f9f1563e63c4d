"""Live-voice API (wake word, speech to text, LLM, text to speech over a WebSocket); not built yet."""
