"""The hub's outbound HTTP, each client built from one tenant row: the guarded
httpx client (http.py over aiohttp_transport.py), the Evolution API client
(evolution.py) and the agent kinds (agents/<kind>/transport.py).

They live in the tenant registry so that provisioning and its connection tests
(instances) and the pipeline (webhooks) both use them: the arrow stays
webhooks -> instances.
"""
