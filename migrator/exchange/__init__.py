"""Export/import: one container (and its snapshots) as a single-file archive in the layout
of ``lxc export`` / ``incus export``, which LXD and Incus import, and back.

``layout`` holds the archive's member names and index; ``export`` writes an archive,
``import_archive`` reads one (through ``archive_reader``); ``compression``, ``lxd_config`` and
``lxd_idmap`` are what both directions share: the compressions, the config keys and LXD's
record of how native streams' ids are shifted.

The one design decision: both directions stream. An export writes the tar straight into the
compressor and its output, an import reads the archive once; neither makes a temporary copy
of the container, and an import builds it in a scratch volume that becomes the container only
once everything has arrived and been checked.
"""
