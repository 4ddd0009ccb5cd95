"""SQL tables and views of the analyses, created with the store schema (see `store.SCHEMA_SQL`)."""

ANALYSIS_SQL = ""
