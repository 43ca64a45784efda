"""Running a step's cases (here, in local processes or on a Dask cluster), its manifest and its datalist."""
