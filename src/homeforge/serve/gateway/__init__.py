"""Gateway mode: homeforge's keys, roles, limits, audit, metrics and strict validation in front of
other OpenAI-compatible servers (vLLM, llama.cpp's llama-server, TGI, other homeforge servers).

``pool`` (upstreams, health checks, least-busy choice), ``driver`` (``GatewayDriver``: model
names, preparation, JSON calls with failover), ``relay`` (one generation: streaming with
failover before the first token), ``managed`` (``vllm serve`` or another command as a child).
"""

from homeforge.serve.gateway.driver import GatewayDriver

__all__ = ["GatewayDriver"]
