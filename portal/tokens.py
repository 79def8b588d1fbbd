"""Personal access tokens: what scripts, CI pipelines and OpenAI clients sign in with.

A token is shown once, when it is made; the portal keeps only its SHA-256. It acts as its user
on the HTTP API (/api) and the OpenAI-compatible gateway (/v1), never on the browser UI, and it
cannot make more tokens. Revoking one, or deactivating its user, ends it at the next request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timedelta, timezone

from sqlmodel import col, select

from .db import Database
from .models import ApiToken, AuditEvent, User, utcnow
from .request_context import client_address

TOKEN_PREFIX = "lbp_"  # recognisable in logs and by secret scanners
TOKEN_PATTERN = re.compile(r"^lbp_[A-Za-z0-9_-]{43}$")
LAST_USED_EVERY_SECONDS = 60  # one database write a minute per token, not one per request
MAX_TOKENS_PER_USER = 50


class TokenError(ValueError):
    pass


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; they are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class TokenService:
    def __init__(self, db: Database):
        self.db = db

    def create(self, user: User, name: str, *, expires_days: int | None = None,
               actor: User | None = None) -> tuple[str, ApiToken]:
        """A new token for ``user`` (by themselves, or by an admin ``actor``): (the token, its row)."""
        actor = actor or user
        if actor.id != user.id and not actor.is_admin:
            raise PermissionError("only admins may make tokens for other users")
        name = (name or "").strip()
        if not name or len(name) > 100:
            raise TokenError("token name: give a name of 1 to 100 characters (what uses it, e.g. 'gitlab-ci')")
        if expires_days is not None and not 1 <= expires_days <= 3650:
            raise TokenError("expires in days: choose between 1 and 3650, or leave it empty for no expiry")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = ApiToken(user_id=user.id, name=name, token_sha256=token_digest(token), prefix=token[:10],
                       expires_at=utcnow() + timedelta(days=expires_days) if expires_days else None)
        with self.db.session() as s:
            live = s.exec(select(ApiToken).where(ApiToken.user_id == user.id,
                                                 col(ApiToken.revoked_at).is_(None))).all()
            if len(live) >= MAX_TOKENS_PER_USER:
                raise TokenError(f"{user.username} already has {len(live)} tokens: revoke unused ones first")
            s.add(row)
            s.add(AuditEvent(username=actor.username, action="token_create", target=f"user:{user.username}",
                             detail=f"token '{name}' ({row.prefix}…)", client=client_address.get()))
            s.commit()
            s.refresh(row)
        return token, row

    def list(self, user: User) -> list[ApiToken]:
        """The user's tokens, newest first, revoked ones included (their history is useful)."""
        with self.db.session() as s:
            return list(s.exec(select(ApiToken).where(ApiToken.user_id == user.id)
                               .order_by(col(ApiToken.id).desc())).all())

    def revoke(self, actor: User, token_id: int) -> ApiToken:
        """The owner or an admin revokes a token; another user's token id reads as not found."""
        with self.db.session() as s:
            row = s.get(ApiToken, token_id)
            if row is None or (row.user_id != actor.id and not actor.is_admin):
                raise TokenError(f"token {token_id} not found among your tokens")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                s.add(row)
                s.add(AuditEvent(username=actor.username, action="token_revoke", target=f"token:{row.id}",
                                 detail=f"token '{row.name}' ({row.prefix}…)", client=client_address.get()))
                s.commit()
                s.refresh(row)
            return row

    def authenticate(self, token: str, client: str | None = None) -> User | None:
        """The active user a token acts as; None for an unknown, revoked or expired token."""
        if not TOKEN_PATTERN.match(token or ""):
            return None
        now = utcnow()
        with self.db.session() as s:
            row = s.exec(select(ApiToken).where(ApiToken.token_sha256 == token_digest(token))).first()
            if row is None or row.revoked_at is not None:
                return None
            if row.expires_at is not None and _aware(row.expires_at) <= now:
                return None
            user = s.get(User, row.user_id)
            if user is None or not user.is_active:
                return None
            last = _aware(row.last_used_at)
            if last is None or (now - last).total_seconds() > LAST_USED_EVERY_SECONDS or row.last_used_from != client:
                row.last_used_at, row.last_used_from = now, client
                s.add(row)
                s.commit()
                s.refresh(user)
            return user


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
