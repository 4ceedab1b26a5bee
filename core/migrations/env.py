"""Alembic environment: the URL comes from the caller (`pneumo db upgrade`) or the settings."""

from alembic import context

from core.db import make_engine
from core.settings import Settings

url = context.config.get_main_option("sqlalchemy.url") or Settings().sqlalchemy_url
engine = make_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()
