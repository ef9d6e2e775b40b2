"""The sections of ``triage_node.config.Settings``, one module per part of the node.

Each module holds one section's fields and the validators that read only those fields;
``triage_node.config`` composes them into the one ``Settings`` class and keeps what needs
the whole (sources, checks across sections, derived values). Import settings from
``triage_node.config``, not from here.
"""

from pathlib import Path

#: The checkout (or installed tree) root; section defaults that name shipped files start here.
REPO_ROOT = Path(__file__).resolve().parents[2]
