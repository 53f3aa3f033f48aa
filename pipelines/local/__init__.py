"""Local (offline) inference servers: Piper TTS, Whisper STT and a Qwen LLM.

Each model runs in its own process behind a loopback HTTP API that unmodified Pipecat
services speak (``PiperHttpTTSService``, ``OpenAISTTService``, ``OpenAILLMService``).
Start them with :class:`pipelines.local.supervisor.LocalModelServers`. Nothing here imports
a model runtime at import time; ``piper_server`` (GPL-3.0-or-later, it imports piper-tts)
is only ever run as a separate process.
"""
