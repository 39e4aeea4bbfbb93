"""`sdrt serve`: an HTTP service speaking the AUTOMATIC1111 and OpenAI image APIs (needs the `serve` extra)."""
