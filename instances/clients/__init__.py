"""The hub's outbound HTTP: one guarded httpx client (http.py over
aiohttp_transport.py) and the Evolution API client built from one tenant row
(evolution.py). Here, in the tenant registry, so that provisioning (instances)
and the pipeline (webhooks) both use them and the arrow stays webhooks -> instances.
"""
