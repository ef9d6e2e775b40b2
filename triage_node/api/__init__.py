"""HTTP API of the node (FastAPI): token auth, STOW-RS, and the worklist's routers.

`triage_node.api.app.create_app` builds the application.
"""
