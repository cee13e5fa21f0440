"""The settings of ``tribunal serve``, the HTTP endpoint help desks push tickets to.

They are ``Settings`` fields like any other (``TRIBUNAL_SERVE_TOKEN``, ``serve_port = 8080``
in a fleet file, a ``.env`` line), declared here so that ``common.settings`` stays one
screenful per concern: ``Settings`` inherits them.

Signatures follow the common webhook scheme: an HMAC-SHA256 of the raw body with a shared
secret, in a header, as hex or base64, optionally prefixed ``sha256=`` (GitHub's
``X-Hub-Signature-256``, Jira's ``X-Hub-Signature``); with ``serve_signature_timestamp_header``
the header's value is prepended to the body before signing, as Zendesk does
(``base64(HMACSHA256(TIMESTAMP + BODY))`` in ``X-Zendesk-Webhook-Signature`` with
``X-Zendesk-Webhook-Signature-Timestamp``:
https://developer.zendesk.com/documentation/webhooks/verifying/).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator


class ServeSettings(BaseModel):
    """``tribunal serve``: where it listens, whom it lets in, how much it takes at once."""

    serve_host: str = Field(default="127.0.0.1", description="Address `serve` binds.")
    serve_port: int = Field(default=8080, ge=1, le=65535, description="Port `serve` binds.")
    serve_token: SecretStr | None = Field(
        default=None,
        description="Bearer token every POST must carry (Authorization: Bearer TOKEN); "
        "unset: none asked.",
    )
    serve_signature_secret: SecretStr | None = Field(
        default=None,
        description="Shared secret of signed webhooks: each POST must carry the HMAC-SHA256 "
        "of its body in serve_signature_header; unset: no signature asked.",
    )
    serve_signature_header: str = Field(
        default="X-Hub-Signature-256",
        description="Header with the signature (Zendesk: X-Zendesk-Webhook-Signature).",
    )
    serve_signature_encoding: Literal["hex", "base64"] = Field(
        default="hex", description="How the signature is written (Zendesk: base64)."
    )
    serve_signature_timestamp_header: str | None = Field(
        default=None,
        description="Header whose value is signed before the body (Zendesk: "
        "X-Zendesk-Webhook-Signature-Timestamp); unset: the body alone is signed.",
    )
    serve_signature_max_age_s: int = Field(
        default=86_400,
        ge=0,
        description="A signed timestamp older (or further ahead) than this is refused, so a "
        "captured webhook cannot be replayed once decided_ttl_s forgot its id (a desk's later "
        "retry keeps its timestamp: too short a window refuses it); 0: not checked.",
    )
    serve_max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Larger request bodies are refused (413)."
    )
    serve_retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After of a 429 (backlog) or 503 (Redis away)."
    )

    @field_validator("serve_token", "serve_signature_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose passes ``${SERVE_TOKEN:-}``: an empty variable means none, not "".
        return None if value == "" else value
