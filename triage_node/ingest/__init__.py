"""Ingest: the DICOM listener (SCP), the durable spool and the instance store.

Public API: `Spool`, `validate_uid`, `InvalidUID` (spool); `InstanceStore`,
`StoreOutcome` and the status constants (store); `StorageSCP` (scp).
"""
