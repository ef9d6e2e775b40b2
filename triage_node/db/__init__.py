"""Database: models, engine/session factory, audit writes, schema checks."""
