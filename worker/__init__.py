"""The worker side: Celery tasks, the triage pipeline and the model code."""
