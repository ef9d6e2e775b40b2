"""The priority worklist: how studies are ranked (``priority``) and read (``queries``)."""
