"""Local model servers: GGUF files from PyPI packages (``models``) served by llama.cpp's
``llama-server`` processes that tribunal starts, watches and stops (``llama``)."""
