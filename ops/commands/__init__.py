"""The `pneumo` commands by area (ops/cli.py assembles them into one app): models and training,
site acceptance and adaptation, and what IT on call runs (send, status, resend, dashboard,
retention, db)."""
