"""Admin actions on users and the audit log. Every function checks that the actor is an admin."""

from __future__ import annotations

from sqlmodel import col, select

from .db import Database
from .models import AuditEvent, User
from .request_context import client_address


def _require_admin(actor: User) -> None:
    if not actor.is_admin:
        raise PermissionError("only admins may do this")


class UserAdmin:
    def __init__(self, db: Database):
        self.db = db

    def list_users(self, actor: User) -> list[User]:
        _require_admin(actor)
        with self.db.session() as s:
            return list(s.exec(select(User).order_by(User.username)).all())

    def set_active(self, actor: User, username: str, active: bool) -> User:
        """Deactivating ends the user's sessions at their next request (the guard checks it)."""
        _require_admin(actor)
        if username == actor.username and not active:
            raise ValueError("you cannot deactivate yourself")
        with self.db.session() as s:
            user = s.exec(select(User).where(User.username == username)).first()
            if user is None:
                raise ValueError(f"no user named '{username}'")
            user.is_active = active
            s.add(user)
            s.add(AuditEvent(username=actor.username, action="activate_user" if active else "deactivate_user",
                             target=f"user:{username}", client=client_address.get()))
            s.commit()
            s.refresh(user)
            return user

    def audit_events(self, actor: User, username: str | None = None, action: str | None = None,
                     limit: int = 500) -> list[AuditEvent]:
        _require_admin(actor)
        with self.db.session() as s:
            query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
            if username:
                query = query.where(AuditEvent.username == username)
            if action:
                query = query.where(AuditEvent.action == action)
            return list(s.exec(query).all())
