"""Raw data sources: each reads its own files and returns a :class:`~towerrec.data.schema.RawDataset`.

One module per source: :mod:`~towerrec.data.sources.hm` (the H&M sample),
:mod:`~towerrec.data.sources.movielens`, :mod:`~towerrec.data.sources.table` (any CSV/parquet with a
column mapping) and :mod:`~towerrec.data.sources.synthetic` (the generated default shop), over the
shared readers of :mod:`~towerrec.data.sources.readers`.

Every source keeps ids as strings and rows in source order (nothing is sorted), raises
:class:`~towerrec.data.schema.DataError` on input it cannot trust and counts the rows it drops (see
:mod:`towerrec.data.validate`). The item catalog lists every item the source knows of, including items
that were never interacted with (cold-start candidates). A config names a source by its
``_target_``, e.g. ``towerrec.data.sources.table.load_table``.
"""
