"""Speech to text for voice notes: an OpenAI-compatible /audio/transcriptions
(OpenAI, Groq, a local faster-whisper or whisper.cpp server), built from one
instance's stt_url, stt_key and stt_model.

A transcription changes nothing anywhere, so unlike an agent call every failure
without an answer (timeouts included) may be tried again; 429 and 5xx too. A
4xx is the request's or the key's fault: not retried, the body kept (a 401's
"Incorrect API key" is what the operator must read).
"""

import asyncio

import httpx

from instances.clients.http import OutboundError, OutboundRefused, describe_body
from instances.models import InstanceConfig

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class Transcriber:
    def __init__(self, *, instance: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.url = f"{instance.stt_url.rstrip('/')}/audio/transcriptions"
        self.headers = {"authorization": f"Bearer {instance.stt_key}"} if instance.stt_key else {}
        self.model = instance.stt_model
        # A minute of audio takes a few seconds; the agent's timeout bounds it.
        self.deadline = float(instance.agent_timeout)
        self.http = http

    async def transcribe(self, *, audio: bytes, mime_type: str, file_name: str) -> str:
        """The transcript's text ("" when the audio holds no speech); raises OutboundError."""
        files = {"file": (file_name or "voice.ogg", audio, mime_type or "audio/ogg")}
        try:
            async with asyncio.timeout(self.deadline):
                response = await self.http.post(
                    self.url,
                    data={"model": self.model, "response_format": "json"},
                    files=files,
                    headers=self.headers,
                    timeout=httpx.Timeout(self.deadline, connect=5.0),
                )
        except OutboundRefused as exc:
            raise OutboundError(f"transcription refused: {exc}", retryable=False) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise OutboundError(
                f"transcription timed out after {self.deadline:g}s", retryable=True
            ) from exc
        except httpx.TransportError as exc:
            raise OutboundError(
                f"transcription server unreachable: {exc!r}", retryable=True
            ) from exc
        if response.status_code >= 300:
            raise OutboundError(
                f"transcription answered {response.status_code}: {describe_body(response)}",
                retryable=response.status_code in RETRYABLE_STATUSES,
                status=response.status_code,
            )
        return _text(response)


def _text(response: httpx.Response) -> str:
    # response_format=json answers {"text": ...}; a server that ignores it may
    # answer the text itself.
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise OutboundError(
            f"transcription answered no text: {describe_body(response)}", retryable=False
        )
    return text.strip()
